"""Legibility measurement: how much of the fine detail each downsampling filter leaves in the half-resolution
view, and how much the full resolution keeps (see docs/shapesworld.md).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
from PIL import Image

from .rendering import (
    GLYPH_H,
    GLYPH_W,
    downsample,
    glyph_cut_by_grid,
    label_origin,
    outline_alpha,
    render,
    render_array,
)
from .world import CHARS, PATTERNS, Background, Scene, SceneObject, sample_scene, scene_rng

_DIRECTIONS = ((1, 0), (0, 1), (1, 1), (1, -1))
_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}


def _texture_features(lum: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean absolute luminance difference between neighbouring pixels inside `mask`, along 4 directions."""
    h, w = lum.shape
    features = []
    for dx, dy in _DIRECTIONS:
        top, bottom = max(0, -dy), h - max(0, dy)
        a, b = np.s_[top:bottom, 0 : w - dx], np.s_[top + dy : bottom + dy, dx:w]
        both = mask[a] & mask[b]
        features.append(float(np.abs(lum[a] - lum[b])[both].mean()) if both.any() else 0.0)
    return np.array(features)


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(rgb, np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def _mean_square_difference(a: Image.Image, b: Image.Image) -> float:
    return float(((np.asarray(a, np.float32) - np.asarray(b, np.float32)) ** 2).mean())


def _normalised(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(-1, keepdims=True)
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)


def _glyph_window(obj: SceneObject, image_size: int, factor: int) -> tuple[slice, slice]:
    """The pixels of a view (downsampled by `factor`) that show the object's glyph, plus a 1-pixel rim at
    reduced resolution to catch any blur."""
    gx, gy = label_origin(obj, image_size)
    if factor == 1:
        return np.s_[gy : gy + GLYPH_H, gx : gx + GLYPH_W]
    return np.s_[gy // 2 - 1 : (gy + GLYPH_H) // 2 + 1, gx // 2 - 1 : (gx + GLYPH_W) // 2 + 1]


def _glyph_templates(image_size: int, resample: Image.Resampling) -> dict[int, np.ndarray]:
    """Per view (factor 1 or 2), an array (n_chars, n_pixels): each character as that view shows it, on a
    large square in the middle of a plain image, rendered and downsampled like the data."""
    templates: dict[int, list[np.ndarray]] = {1: [], 2: []}
    for c in CHARS:
        obj = SceneObject(
            shape="square", colour="blue", size="large", pattern="solid", region="center", char=c, x=0.5, y=0.5
        )
        scene = Scene(objects=(obj,), background=Background("plain", (210, 210, 210), (210, 210, 210)))
        full = render(scene, image_size)
        for factor, view in ((1, full), (2, downsample(full, 2, resample))):
            templates[factor].append(_luminance(view)[_glyph_window(obj, image_size, factor)].ravel())
    return {f: _normalised(np.stack(t)) for f, t in templates.items()}


def legibility_report(
    image_size: int = 128, seed: int = 0, n_scenes: int = 200, half_filter: str = "bicubic", high_res_grid: int = 2
) -> dict[str, float]:
    """Measure how much fine detail survives in the half-resolution view, over `n_scenes` random scenes.

    * `retained_<filter>`: RMS of what the fine layer changes in the half-resolution view made with that PIL
      filter, divided by the RMS of what it changes at full resolution. About 1 for detail that simply
      shrinks; 0 when the view does not show it at all. Bicubic is the filter the fine layer is built for.
    * `pattern_accuracy_<view>`: a 1-nearest-neighbour classifier of the pattern from 4 directional
      neighbour differences inside each object (away from its outline and label), trained on half of the
      objects and tested on the other half (chance 0.25).
    * `glyph_accuracy_<view>`: a template matcher that knows where the glyph is and compares it with each
      character rendered the same way and seen in the same view (chance 1/36).
    * `glyphs_cut`: the share of glyphs that the crop borders of a `high_res_grid` x `high_res_grid` high-res
      view run through (`glyph_cut_by_grid`), and `glyph_accuracy_crop`: the same template matcher at full
      resolution, shown only the part of the glyph that the crop holding most of it shows.

    The half view of the two classifiers is made with `half_filter`, one of "bicubic", "bilinear", "box",
    "lanczos" and "nearest".
    """
    resample = _FILTERS[half_filter]
    templates = _glyph_templates(image_size, resample)
    squared = Counter()
    features: dict[int, list[np.ndarray]] = {1: [], 2: []}
    pattern_labels, glyph_hits, n_glyphs, n_cut = [], Counter(), 0, 0
    for i in range(n_scenes):
        scene = sample_scene(scene_rng(seed, "legibility", i))
        full = render(scene, image_size)
        coarse = Image.fromarray(render_array(scene, image_size, fine_detail=False), "RGB")
        squared["full"] += _mean_square_difference(full, coarse)
        for name, other in _FILTERS.items():
            squared[name] += _mean_square_difference(downsample(full, 2, other), downsample(coarse, 2, other))
        lum = {1: _luminance(full), 2: _luminance(downsample(full, 2, resample))}
        for obj in scene.objects:
            x0, y0, alpha = outline_alpha(obj, image_size)
            inside = np.zeros((image_size, image_size), bool)
            inside[y0 : y0 + alpha.shape[0], x0 : x0 + alpha.shape[1]] = alpha >= 1
            if obj.char is not None:
                n_glyphs += 1
                gx, gy = label_origin(obj, image_size)
                inside[gy - 2 : gy + GLYPH_H + 2, gx - 2 : gx + GLYPH_W + 2] = False
                for f in (1, 2):
                    crop = _normalised(lum[f][_glyph_window(obj, image_size, f)].ravel())
                    glyph_hits[f] += CHARS[int(np.argmax(templates[f] @ crop))] == obj.char
                n_cut += glyph_cut_by_grid(obj, image_size, high_res_grid)
                shown = _largest_crop_part(gx, gy, image_size, high_res_grid).ravel()
                seen = _normalised(lum[1][_glyph_window(obj, image_size, 1)].ravel()[shown])
                glyph_hits["crop"] += CHARS[int(np.argmax(_normalised(templates[1][:, shown]) @ seen))] == obj.char
            # A half-resolution pixel is inside if its whole 2x2 block is, less a rim the filter blurs.
            half_inside = _erode(inside.reshape(image_size // 2, 2, image_size // 2, 2).all(axis=(1, 3)))
            if half_inside.sum() >= 4:
                features[1].append(_texture_features(lum[1], _erode(inside)))
                features[2].append(_texture_features(lum[2], half_inside))
                pattern_labels.append(PATTERNS.index(obj.pattern))
    labels = np.array(pattern_labels)
    report: dict[str, float] = {
        "image_size": image_size,
        "scenes": n_scenes,
        "objects": len(labels),
        "glyphs": n_glyphs,
    }
    for name in _FILTERS:
        report[f"retained_{name}"] = math.sqrt(squared[name] / squared["full"])
    for f, view in ((1, "full"), (2, "half")):
        feats = np.stack(features[f])
        # Which directions vary, and how much: stripes, checks and dots differ in the first, solid in the
        # second.
        energy = feats.sum(1, keepdims=True)
        profile = np.concatenate([feats / (energy + 1e-6), np.log1p(energy)], 1)
        train, test = profile[0::2], profile[1::2]
        nearest = ((test[:, None] - train[None]) ** 2).sum(-1).argmin(1)
        report[f"pattern_accuracy_{view}"] = float((labels[0::2][nearest] == labels[1::2]).mean())
        report[f"glyph_accuracy_{view}"] = glyph_hits[f] / max(n_glyphs, 1)
    report["glyphs_cut"] = n_cut / max(n_glyphs, 1)
    report["glyph_accuracy_crop"] = glyph_hits["crop"] / max(n_glyphs, 1)
    return report


def _largest_crop_part(gx: int, gy: int, image_size: int, grid: int) -> np.ndarray:
    """(GLYPH_H, GLYPH_W) mask of the glyph pixels that fall in the grid x grid crop holding most of them."""
    rows = (np.arange(gy, gy + GLYPH_H) * grid) // image_size
    cols = (np.arange(gx, gx + GLYPH_W) * grid) // image_size
    tile = rows[:, None] * grid + cols[None, :]
    return tile == np.bincount(tile.ravel()).argmax()
