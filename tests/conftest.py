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
