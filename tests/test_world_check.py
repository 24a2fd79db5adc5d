"""The out-of-world check (sparsecut/evaluation/world_check.py) and the chat's notice for pictures outside the world."""

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from demo.engine import ChatEngine, ChatSession, GenerationSettings
from sparsecut.evaluation.world_check import WorldCheck
from sparsecut.testing import tiny_model

WORLD = "smooth pastel gradients"


def in_world(seed: int) -> Image.Image:
    """A smooth light gradient: the tiny model's "world"."""
    rng = np.random.default_rng(seed)
    start, end = rng.uniform(150, 255, 3), rng.uniform(150, 255, 3)
    ramp = np.linspace(0, 1, 48)[None, :, None]
    return Image.fromarray((start + (end - start) * ramp).repeat(48, 0).astype(np.uint8))


def noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model_and_check():
    model, processor = tiny_model()
    fitted = [in_world(i) for i in range(80)]
    calibration = [in_world(1000 + i) for i in range(40)]
    check = WorldCheck.fit(model, processor, fitted, calibration, quantile=0.95, world=WORLD)
    return model, processor, check


def test_the_threshold_flags_the_chosen_share_of_in_world_images(model_and_check):
    model, processor, check = model_and_check
    calibration = check.distances(model, processor, [in_world(1000 + i) for i in range(40)])
    assert (calibration > check.threshold).mean() <= 0.05
    unseen = check.distances(model, processor, [in_world(5000 + i) for i in range(40)])
    assert (unseen > check.threshold).mean() <= 0.2


def test_pictures_unlike_the_world_are_outside(model_and_check):
    model, processor, check = model_and_check
    assert all(check.is_outside(model, processor, noise(i)) for i in range(5))
    assert sum(check.is_outside(model, processor, in_world(5000 + i)) for i in range(10)) <= 2


def test_saved_check_scores_alike_and_names_its_world(model_and_check, tmp_path):
    model, processor, check = model_and_check
    check.save(tmp_path / "world_check.safetensors")
    loaded = WorldCheck.for_model(tmp_path)
    images = [noise(1), in_world(3)]
    np.testing.assert_allclose(loaded.distances(model, processor, images), check.distances(model, processor, images))
    assert loaded.threshold == check.threshold and WORLD in loaded.notice()
    assert WorldCheck.for_model(tmp_path / "elsewhere") is None


def test_too_few_images_or_a_bad_quantile_are_refused(model_and_check):
    model, processor, _ = model_and_check
    with pytest.raises(ValueError, match="too few"):
        WorldCheck.fit(model, processor, [in_world(0)] * 3, [in_world(1)])
    with pytest.raises(ValueError, match="quantile"):
        WorldCheck.fit(model, processor, [in_world(0)] * 3, [in_world(1)], quantile=0)


def test_the_chat_says_when_a_picture_is_outside_the_world_and_still_answers(model_and_check):
    model, processor, check = model_and_check
    # A looser threshold (still far below any noise image's distance), so that the in-world picture is inside.
    engine = ChatEngine(model, processor, max_new_tokens=8, world_check=replace(check, threshold=3 * check.threshold))
    session = ChatSession()
    settings = GenerationSettings(max_new_tokens=4)
    *_, turn = session.ask(engine, "What is in this image?", noise(7), settings)
    assert turn.status == "done" and turn.answer
    assert any(WORLD in notice for notice in turn.notices) and WORLD in turn.reply()
    *_, turn = session.ask(engine, "And this one?", in_world(1002), settings)
    assert turn.status == "done" and not any(WORLD in notice for notice in turn.notices)
    *_, turn = session.ask(engine, "A follow-up without a new picture", None, settings)
    assert not any(WORLD in notice for notice in turn.notices)
