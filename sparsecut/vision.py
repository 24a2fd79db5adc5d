"""Vision views and multi-level encoder features (method note, "Parts" 1).

Each image gives 1 + grid**2 views of the encoder's input size: the low-res view (the whole image) and the
high-res view (the image at grid x the size) cut into grid x grid crops, row-major. All views of all images
go through the frozen encoder as one batch with `output_hidden_states=True`; the prefix tokens (CLS,
registers) are dropped so that every selected layer yields one token per patch.

Overlapping crops (`high_res_overlap`, not in the paper): the encoder sees each crop alone, so detail that a
crop border runs through (a printed character in the middle of the image) reaches it only as two halves. With
overlap the high-res view is cut into (2*grid - 1)**2 crops at half a crop's stride, and each high-res patch
token is taken from the crop whose centre is nearest to it (`stitch_overlapping_crops`): every token then comes
from a crop that shows at least a quarter crop around it (up to the image's edge), and the fusion receives the same
grid x grid layout of tokens as without overlap. It costs encoder work only, not LLM input tokens.
"""

from __future__ import annotations

import functools

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


RESIZE_MODES = ("squash", "crop")


def resize_square(image: Image.Image, size: int, mode: str) -> Image.Image:
    """The image as a size x size square: "squash" resizes it whole (after any padding, no distortion), "crop"
    resizes its shortest side to `size` and cuts the centre square (CLIP's preprocessing, llava-hf's LLaVA-1.5),
    with the rounding of transformers' image processors, so both give the same pixels."""
    if mode == "squash":
        return image.resize((size, size), Image.Resampling.BICUBIC)
    if mode != "crop":
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {mode!r}.")
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_width, new_height = (size, new_long) if width <= height else (new_long, size)
    resized = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def fit_within(image: Image.Image, side: int) -> Image.Image:
    """The image scaled down (never up, aspect kept) to a longest side of at most `side` pixels: padding it to a
    square afterwards then costs side * side pixels, not the square of its own longest side."""
    width, height = image.size
    if max(width, height) <= side:
        return image
    scale = side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def crops_per_side(grid: int, overlap: bool) -> int:
    """High-res crops per side: grid, or 2 * grid - 1 when they overlap by half a crop."""
    return 2 * grid - 1 if overlap else grid


def make_views(
    image: Image.Image,
    size: int,
    grid: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    pad: bool = True,
    overlap: bool = False,
    resize: str = "squash",
    pad_color: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """The 1 + crops normalised views of one RGB image: (views, 3, size, size) float32, where crops is grid**2,
    or (2 * grid - 1)**2 crops at a stride of size // 2 with `overlap`. `resize`: see `resize_square`; `pad`
    fills with `pad_color`, by default the mean colour rounded (LLaVA-1.5's own code truncates: int(255 * m))."""
    if pad:
        image = pad_to_square(image, pad_color or tuple(int(round(255 * m)) for m in mean))
    low = resize_square(image, size, resize)
    high = resize_square(image, size * grid, resize)
    stride, count = size // 2 if overlap else size, crops_per_side(grid, overlap)
    offsets = [(x * stride, y * stride) for y in range(count) for x in range(count)]
    crops = [high.crop((x, y, x + size, y + size)) for x, y in offsets]
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


@functools.lru_cache(maxsize=8)
def nearest_crop(side: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the grid * side high-res patch rows (or columns): the overlapping crop whose centre is nearest
    to it and its row inside that crop. Crop k starts at patch k * side / 2; centres and patch centres never tie
    (whole against half patches)."""
    half = side // 2
    centres = torch.arange(crops_per_side(grid, True)) * half + half  # (k,) in patches
    rows = torch.arange(grid * side)
    crop = (2 * centres[None, :] - (2 * rows[:, None] + 1)).abs().argmin(dim=1)  # (grid * side,)
    return crop, rows - crop * half


def stitch_overlapping_crops(tokens: torch.Tensor, grid: int, side: int) -> torch.Tensor:
    """Tokens of the low-res view and the (2 * grid - 1)**2 overlapping crops -> the low-res view and grid**2
    non-overlapping crops, each high-res patch token taken from the crop nearest to it.

    tokens: (N, 1 + (2 * grid - 1)**2, side * side, d) -> (N, 1 + grid**2, side * side, d)
    """
    n, _, _, d = tokens.shape
    k = crops_per_side(grid, True)
    crops = tokens[:, 1:].reshape(n, k, k, side, side, d)
    crop, local = nearest_crop(side, grid)
    crop, local = crop.to(tokens.device), local.to(tokens.device)
    high = crops[:, crop[:, None], crop[None, :], local[:, None], local[None, :]]  # (N, G, G, d), G = grid * side
    high = high.reshape(n, grid, side, grid, side, d).transpose(2, 3)  # (N, cy, cx, row, col, d)
    return torch.cat([tokens[:, :1], high.reshape(n, grid * grid, side * side, d)], dim=1)
