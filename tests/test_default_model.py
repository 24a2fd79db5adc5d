"""The shipped default model (weights/) loads on the CPU and answers held-out ShapesWorld questions."""

import pytest

from sparsecut import load_model
from sparsecut.build import DEFAULT_WEIGHTS
from sparsecut.evaluate import predict
from sparsecut.llava_format import load_llava_json
from sparsecut.metrics import is_correct
from sparsecut.shapesworld import generate_dataset

pytestmark = pytest.mark.skipif(
    not (DEFAULT_WEIGHTS / "config.json").is_file(), reason="the default model is not in weights/"
)


@pytest.fixture(scope="module")
def default_model():
    return load_model(device="cpu")


def test_default_model_answers_held_out_questions(tmp_path, default_model):
    # The test split is generated from its own seeded streams, never trained on; image i is the same scene as
    # in the evaluation of the model card.
    test_json = generate_dataset(tmp_path, n_images=12, seed=0, split="test")
    samples = [s for s in load_llava_json(test_json, image_root=str(tmp_path)) if s.meta["family"] != "description"]
    samples = samples[:24]
    assert len(samples) >= 20
    model, processor = default_model
    predictions = predict(model, processor, samples, batch_size=8, max_new_tokens=16)
    hits = [is_correct(p, s.turns[1][1]) for p, s in zip(predictions, samples)]
    assert sum(hits) / len(hits) >= 0.85, list(zip(predictions, [s.turns[1][1] for s in samples]))


def test_default_model_still_answers_text_only_questions(default_model):
    model, processor = default_model
    messages = [[{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    assert "Paris" in answer
