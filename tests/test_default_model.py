"""The shipped default model (weights/) loads on the CPU, answers held-out ShapesWorld questions in the standard
templates and in phrasings it never saw, answers text-only prompts as its base LLM, and says when a picture is
not a ShapesWorld scene."""

import pytest

from sparsecut import load_model
from sparsecut.build import DEFAULT_WEIGHTS, load_llm
from sparsecut.data.llava_format import load_llava_json
from sparsecut.data.shapesworld import generate_dataset, render, sample_scene, scene_rng
from sparsecut.evaluation.evaluate import predict
from sparsecut.evaluation.metrics import is_correct, states_answer
from sparsecut.evaluation.text_only import PROMPTS, compare_with_base
from sparsecut.evaluation.world_check import WorldCheck

pytestmark = pytest.mark.skipif(
    not (DEFAULT_WEIGHTS / "config.json").is_file(), reason="the default model is not in weights/"
)


@pytest.fixture(scope="module")
def default_model():
    return load_model(device="cpu")


def held_out(tmp_path, n_images: int, phrasing: str = "standard") -> list:
    """Questions about the first test-split images: the split is generated from its own seeded streams and
    never trained on; image i is the same scene as in the model card's evaluation."""
    test_json = generate_dataset(tmp_path, n_images=n_images, seed=0, split="test", phrasing=phrasing)
    return [s for s in load_llava_json(test_json, image_root=str(tmp_path)) if s.meta["family"] != "description"]


def accuracy(default_model, samples) -> tuple[float, list]:
    model, processor = default_model
    predictions = predict(model, processor, samples, batch_size=8, max_new_tokens=64)
    right = [
        states_answer(p, s.meta["short"], s.meta["form"]) if "form" in s.meta else is_correct(p, s.turns[1][1])
        for p, s in zip(predictions, samples)
    ]
    return sum(right) / len(samples), [(s.turns[0][1], p, ok) for s, p, ok in zip(samples, predictions, right)]


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


def test_default_model_understands_phrasings_it_never_saw(tmp_path, default_model):
    # Frames, synonyms ("item", "figure", "photo") and instructions reserved for evaluation
    # (sparsecut/data/shapesworld/phrasing.py), answered in the form asked for: a word, a sentence or a reason.
    samples = held_out(tmp_path, 10, phrasing="heldout")[:32]
    assert len(samples) >= 25 and {s.meta["form"] for s in samples} >= {"short", "sentence"}
    score, pairs = accuracy(default_model, samples)
    assert score >= 0.75, pairs


def test_default_model_answers_text_only_prompts_as_its_base_llm(default_model):
    model, processor = default_model
    base, _ = load_llm(model.config.base_llm)
    result = compare_with_base(model, processor, base.eval(), [PROMPTS[0], "Write a haiku about the sea."], 24)
    assert result["equal"] == 1.0 and result["mean_kl"] < 1e-6, result["answers"]


def test_default_model_says_when_a_picture_is_not_a_shapesworld_scene(default_model):
    skimage_data = pytest.importorskip("skimage.data")
    model, processor = default_model
    check = WorldCheck.for_model(DEFAULT_WEIGHTS)
    assert check is not None and "ShapesWorld" in check.notice()
    assert check.is_outside(model, processor, skimage_data.chelsea())  # a photo of a cat
    scene = render(sample_scene(scene_rng(0, "test", 0)), 128)
    assert not check.is_outside(model, processor, scene)
