"""The shipped default model (weights/) loads on the CPU and answers held-out ShapesWorld questions."""

import pytest

from sparsecut import load_model
from sparsecut.build import DEFAULT_WEIGHTS
from sparsecut.data.llava_format import load_llava_json
from sparsecut.data.shapesworld import generate_dataset
from sparsecut.evaluation.evaluate import predict
from sparsecut.evaluation.metrics import is_correct

pytestmark = pytest.mark.skipif(
    not (DEFAULT_WEIGHTS / "config.json").is_file(), reason="the default model is not in weights/"
)


@pytest.fixture(scope="module")
def default_model():
    return load_model(device="cpu")


def held_out(tmp_path, n_images: int) -> list:
    """Short-answer questions about the first test-split images: the split is generated from its own seeded
    streams and never trained on; image i is the same scene as in the model card's evaluation."""
    test_json = generate_dataset(tmp_path, n_images=n_images, seed=0, split="test")
    return [s for s in load_llava_json(test_json, image_root=str(tmp_path)) if s.meta["family"] != "description"]


def accuracy(default_model, samples) -> tuple[float, list]:
    model, processor = default_model
    predictions = predict(model, processor, samples, batch_size=8, max_new_tokens=16)
    answers = [s.turns[1][1] for s in samples]
    return sum(map(is_correct, predictions, answers)) / len(samples), list(zip(predictions, answers))


def test_default_model_answers_held_out_questions(tmp_path, default_model):
    # The families other than character reading (next test).
    samples = [s for s in held_out(tmp_path, 12) if s.meta["family"] != "character"][:24]
    assert len(samples) >= 20
    score, pairs = accuracy(default_model, samples)
    assert score >= 0.85, pairs


def test_default_model_reads_printed_characters(tmp_path, default_model):
    samples = [s for s in held_out(tmp_path, 40) if s.meta["family"] == "character"][:20]
    assert len(samples) >= 10
    score, pairs = accuracy(default_model, samples)
    assert score >= 0.8, pairs


def test_default_model_still_answers_text_only_questions(default_model):
    model, processor = default_model
    messages = [[{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    assert "Paris" in answer
