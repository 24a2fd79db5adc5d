"""Shared fixtures: tiny random models and small images, built in code (no downloads)."""

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def random_image(seed: int, width: int = 48, height: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def image_question(image: Image.Image | None, question: str) -> list[dict]:
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a CUDA GPU: skip them without one (scripts/gpu_check.py runs them on a GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
