"""Vision views and multi-level encoder features (method note, "Parts" 1).

Each image gives 1 + grid**2 views of the encoder's input size: the low-res view (the whole image) and the
high-res view (the image at grid x the size) cut into grid x grid crops, row-major. All views of all images
go through the frozen encoder as one batch with `output_hidden_states=True`; the prefix tokens (CLS,
registers) are dropped so that every selected layer yields one token per patch.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# Normalisation constants of the encoder families, used when a checkpoint ships no preprocessor config.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
DEFAULT_NORMALIZATION = {
    "clip_vision_model": (CLIP_MEAN, CLIP_STD),
    "clip": (CLIP_MEAN, CLIP_STD),
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD),
    "dinov3_vit": (IMAGENET_MEAN, IMAGENET_STD),
}


def default_normalization(model_type: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for an encoder family; SigLIP and ViT use 0.5, which is also the fallback."""
    return DEFAULT_NORMALIZATION.get(model_type, (HALF, HALF))


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre the image on a square canvas (LLaVA-1.5's `expand2square`), so no aspect ratio is distorted and
    even a 1 x 4000 image gives non-empty crops."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def make_views(
    image: Image.Image,
    size: int,
    grid: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    pad: bool = True,
) -> np.ndarray:
    """The 1 + grid**2 normalised views of one RGB image: (views, 3, size, size) float32."""
    if pad:
        image = pad_to_square(image, tuple(int(round(255 * m)) for m in mean))
    low = image.resize((size, size), Image.Resampling.BICUBIC)
    high = image.resize((size * grid, size * grid), Image.Resampling.BICUBIC)
    crops = [high.crop((x * size, y * size, (x + 1) * size, (y + 1) * size)) for y in range(grid) for x in range(grid)]
    views = np.stack([np.asarray(view, dtype=np.float32) for view in (low, *crops)])  # (V, H, W, 3)
    views = (views / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return views.transpose(0, 3, 1, 2).copy()  # (V, 3, H, W)


def encode_layers(
    vision_tower: torch.nn.Module,
    pixel_values: torch.Tensor,
    layers: list[int],
    num_patches: int,
) -> torch.Tensor:
    """Patch tokens of the given hidden-state layers for a batch of views.

    pixel_values: (N, 3, H, W) -> (len(layers), N, num_patches, d). Prefix tokens (CLS, registers) are the
    leading `seq_len - num_patches` tokens in every ViT-style encoder, so they are dropped by count.
    """
    outputs = vision_tower(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
    states = outputs.hidden_states
    seq_len = states[0].shape[1]
    if seq_len < num_patches:
        raise ValueError(f"The encoder returned {seq_len} tokens per view but {num_patches} patches were expected.")
    return torch.stack([states[layer][:, seq_len - num_patches :] for layer in layers])
