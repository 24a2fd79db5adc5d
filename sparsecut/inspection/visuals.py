"""Pictures of what a SparseCut model did on one answer: the shortcut chart and the shortcut and fusion maps.

`render_visuals` draws the panels beside an answer with OpenCV/PIL into fixed-size RGB arrays: `CHART_SIZE`
for the shortcut chart, `VIEW_SIZE` x `VIEW_SIZE` for every map. Maps are drawn over the padded square image
the model saw (the processor pads to a square with the mean colour first). Everything they show comes from the
`ShortcutStats` recorded during the forward pass that produced the answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..modeling import ShortcutStats

VIEW_SIZE = 384  # every map is VIEW_SIZE x VIEW_SIZE pixels
CHART_SIZE = (640, 384)  # (width, height) of the shortcut chart
RATIO_COLORMAP = cv2.COLORMAP_VIRIDIS
ATTENTION_COLORMAP = cv2.COLORMAP_INFERNO
OVERLAY_ALPHA = 0.55  # weight of the colour map over the image


def shortcut_label(vision_layer: int, llm_layer: int) -> str:
    return f"vision layer {vision_layer} → LLM layer {llm_layer}"


def normalise(values: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1] (NaN -> 0; a constant map -> zeros)."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0)
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def overlay(
    image: Image.Image, values: np.ndarray, colormap: int = ATTENTION_COLORMAP, size: int = VIEW_SIZE
) -> np.ndarray:
    """A (rows, cols) map drawn over the image: (size, size, 3) uint8 RGB. Each map cell becomes a block
    (nearest-neighbour upsampling), so the picture shows exactly the model's patch grid."""
    base = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    heat = cv2.resize(normalise(values), (size, size), interpolation=cv2.INTER_NEAREST)
    colours = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), colormap)[..., ::-1]  # BGR -> RGB
    return np.round(base * (1 - OVERLAY_ALPHA) + colours * OVERLAY_ALPHA).astype(np.uint8)


def mark_cell(picture: np.ndarray, row: int, col: int, cells: int) -> np.ndarray:
    """Outline cell (row, col) of a cells x cells grid on a square picture."""
    size = picture.shape[0]
    top, left = round(row * size / cells), round(col * size / cells)
    bottom, right = round((row + 1) * size / cells) - 1, round((col + 1) * size / cells) - 1
    marked = picture.copy()
    cv2.rectangle(marked, (left, top), (right, bottom), (255, 255, 255), 2)
    return marked


def high_res_to_grid(values: np.ndarray, side: int, grid: int) -> np.ndarray:
    """Values over high-res tokens in the fusion's key order (crop-major: h = (cy*grid + cx)*side**2 +
    row*side + col) -> their places on the whole image's (grid*side, grid*side) grid:
    (..., grid*grid*side*side) -> (..., grid*side, grid*side)."""
    values = np.asarray(values)
    lead = values.shape[:-1]
    crops = values.reshape(*lead, grid, grid, side, side)  # (..., cy, cx, row, col)
    return np.moveaxis(crops, -2, -3).reshape(*lead, grid * side, grid * side)  # (..., cy, row, cx, col)


def neighbours_to_grid(values: np.ndarray, side: int, grid: int) -> np.ndarray:
    """concat_mlp neighbour shares (side*side, grid*grid) (low-res patch, neighbour row-major inside the
    patch's area) -> the whole image's (grid*side, grid*side) grid of high-res tokens."""
    areas = np.asarray(values).reshape(side, side, grid, grid)  # (py, px, ny, nx)
    return areas.transpose(0, 2, 1, 3).reshape(side * grid, side * grid)  # (py, ny, px, nx)


def patch_at(x: float, y: float, size: int, side: int) -> tuple[int, int]:
    """The low-res patch (row, col) under pixel (x, y) of a size x size view."""
    clamp = lambda v: min(side - 1, max(0, int(v * side // size)))  # noqa: E731
    return clamp(y), clamp(x)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _draw_arrow(draw: ImageDraw.ImageDraw, x: float, y: float, length: float, colour) -> None:
    # Pillow's bundled font has no "→" glyph, and a system font is not guaranteed on every host.
    draw.line([(x, y), (x + length, y)], fill=colour, width=2)
    draw.polygon([(x + length + 4, y), (x + length - 3, y - 4), (x + length - 3, y + 4)], fill=colour)


def shortcut_means(stats: ShortcutStats, image_index: int = -1) -> list[float]:
    """Mean ||added|| / ||hidden|| over the image tokens of one image, per shortcut (NaN: layer did not run)."""
    ratios = stats.ratios[:, image_index].numpy()  # (k, T_img)
    return [float(np.mean(r)) if np.isfinite(r).any() else math.nan for r in ratios]


def shortcut_chart(stats: ShortcutStats, selected: int | None = None, image_index: int = -1) -> np.ndarray:
    """Horizontal bars of each shortcut's mean ||added|| / ||hidden||, one row per shortcut in LLM-layer order,
    labelled "vision layer v → LLM layer l": (CHART_SIZE[1], CHART_SIZE[0], 3) uint8 RGB."""
    width, height = CHART_SIZE
    picture = Image.new("RGB", CHART_SIZE, "white")
    draw = ImageDraw.Draw(picture)
    ink, grey = (30, 30, 30), (150, 150, 150)
    draw.text((12, 10), "Shortcut contributions: mean |added| / |hidden| at image tokens", fill=ink, font=_font(16))
    means = shortcut_means(stats, image_index)
    if not means:
        draw.text((12, height // 2), "This model has no shortcuts.", fill=ink, font=_font(15))
        return np.asarray(picture)
    top, bottom, bar_left, bar_right = 44, height - 34, 250, width - 70
    row_height = min(36.0, (bottom - top) / len(means))
    finite = [m for m in means if math.isfinite(m)]
    scale = max(finite) if finite and max(finite) > 0 else 1.0
    font = _font(max(10, min(14, int(row_height * 0.5))))
    order = sorted(range(len(means)), key=lambda k: (stats.llm_layers[k], k))
    for row, k in enumerate(order):
        y = top + row * row_height
        middle = y + row_height / 2
        first, second = f"vision layer {stats.vision_layers[k]}", f"LLM layer {stats.llm_layers[k]}"
        draw.text((12, middle), first, fill=ink, font=font, anchor="lm")
        arrow_x = 12 + draw.textlength(first, font=font) + 6
        _draw_arrow(draw, arrow_x, middle, 14, ink)
        draw.text((arrow_x + 24, middle), second, fill=ink, font=font, anchor="lm")
        value = means[k]
        if not math.isfinite(value):
            draw.text((bar_left, middle), "n/a", fill=grey, font=font, anchor="lm")
            continue
        right = bar_left + (bar_right - bar_left) * value / scale
        colour = (230, 120, 30) if k == selected else (60, 110, 180)
        draw.rectangle([bar_left, y + row_height * 0.18, max(right, bar_left + 1), y + row_height * 0.82], fill=colour)
        draw.text((right + 6, middle), f"{value:.3f}", fill=ink, font=font, anchor="lm")
    draw.line([(bar_left, bottom + 4), (bar_right, bottom + 4)], fill=grey, width=1)
    for fraction in (0.0, 0.5, 1.0):
        x = bar_left + (bar_right - bar_left) * fraction
        draw.line([(x, bottom + 2), (x, bottom + 8)], fill=grey, width=1)
        draw.text((x, bottom + 10), f"{scale * fraction:.3g}", fill=grey, font=_font(11), anchor="mt")
    draw.text((12, bottom + 10), "top: earliest LLM layer", fill=grey, font=_font(11), anchor="lt")
    return np.asarray(picture)


@dataclass
class Visuals:
    """The panels beside an answer. Maps are (VIEW_SIZE, VIEW_SIZE, 3) uint8, the chart CHART_SIZE."""

    chart: np.ndarray | None = None
    shortcut_map: np.ndarray | None = None
    fusion_maps: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (vision layer, map), fused layers
    fusion_map: np.ndarray | None = None  # the selected layer's map
    query_map: np.ndarray | None = None
    shortcut_note: str = ""  # markdown explaining the shortcut map
    fusion_note: str = ""  # markdown explaining the fusion maps
    summary: dict = field(default_factory=dict)  # the numbers behind the pictures, JSON-able


def fusion_kind(stats: ShortcutStats) -> str:
    if stats.fusion_attention is not None:
        return "cross_attention"
    return "concat_mlp" if stats.fusion_contribution is not None else "none"


class InspectedAnswer(Protocol):
    """What `render_visuals` reads from an answer (the demo's `demo.engine.Answer` is one)."""

    stats: ShortcutStats | None  # from the forward pass that produced the answer; None for a text-only prompt
    view: Image.Image | None  # the padded square image the model saw
    cost: Any  # has `as_dict()`: the answer's cost, copied into `Visuals.summary`


def render_visuals(
    answer: InspectedAnswer | None, shortcut: int = 0, vision_layer: int | None = None, row: int = 0, col: int = 0
) -> Visuals:
    """Everything the demo shows about `answer`, for the chosen shortcut, fused vision layer (None: the last
    fused layer) and low-res query patch (row, col)."""
    if answer is None or answer.stats is None or answer.view is None:
        nothing = "The latest answer had no image, so there is nothing to show."
        return Visuals(shortcut_note=nothing, fusion_note=nothing)
    stats, view = answer.stats, answer.view
    side, grid = stats.patches_per_side, stats.high_res_grid
    k = len(stats.vision_layers)
    shortcut = min(max(shortcut, 0), max(k - 1, 0))
    row, col = min(max(row, 0), side - 1), min(max(col, 0), side - 1)
    if vision_layer not in stats.fused_layers:
        vision_layer = stats.fused_layers[-1]
    slot = stats.fused_layers.index(vision_layer)
    means = shortcut_means(stats)
    visuals = Visuals(chart=shortcut_chart(stats, selected=shortcut))
    visuals.summary = {
        "shortcuts": [
            {"index": i, "vision_layer": v, "llm_layer": layer, "mean_ratio": None if math.isnan(m) else m}
            for i, (v, layer, m) in enumerate(zip(stats.vision_layers, stats.llm_layers, means))
        ],
        "selected_shortcut": shortcut,
        "fusion": fusion_kind(stats),
        "fused_layers": stats.fused_layers,
        "vision_layer": vision_layer,
        "patch": [row, col],
        "patches_per_side": side,
        "high_res_grid": grid,
        "cost": answer.cost.as_dict(),
        "view_size": VIEW_SIZE,
        "chart_size": list(CHART_SIZE),
    }
    if k:
        # Only the low-res view's tokens enter the LLM (except in the appended-tokens baseline, whose
        # low-res tokens come first), and they sit on the side x side patch grid.
        ratios = stats.ratios[shortcut, -1, : side * side].numpy().reshape(side, side)
        visuals.shortcut_map = overlay(view, ratios, RATIO_COLORMAP)
        visuals.shortcut_note = (
            f"**{shortcut_label(stats.vision_layers[shortcut], stats.llm_layers[shortcut])}**: |added| / |hidden| "
            f"per image patch, from {np.nanmin(ratios):.3f} (dark) to {np.nanmax(ratios):.3f} (bright)."
        )
    else:
        visuals.shortcut_note = "This model has no shortcuts."
    kind = fusion_kind(stats)
    if kind == "cross_attention":
        _attention_visuals(visuals, stats, view, slot, row, col)
    elif kind == "concat_mlp":
        _contribution_visuals(visuals, stats, view, slot, row, col)
    else:
        visuals.fusion_note = (
            "This model has no multi-grained fusion (fusion='none'): the LLM sees low-res tokens only."
        )
    return visuals


def _attention_visuals(visuals: Visuals, stats: ShortcutStats, view: Image.Image, slot: int, row: int, col: int):
    side, grid, cells = stats.patches_per_side, stats.high_res_grid, stats.patches_per_side * stats.high_res_grid
    attention = stats.fusion_attention[:, -1].numpy()  # (L, P, G*P)
    received = high_res_to_grid(attention.sum(axis=1), side, grid)  # (L, cells, cells): mass each key receives
    visuals.fusion_maps = [(v, overlay(view, received[j])) for j, v in enumerate(stats.fused_layers)]
    visuals.fusion_map = visuals.fusion_maps[slot][1]
    query = high_res_to_grid(attention[slot, row * side + col], side, grid)  # (cells, cells)
    visuals.query_map = mark_cell(overlay(view, query), row, col, side)
    own_area = float(query[row * grid : (row + 1) * grid, col * grid : (col + 1) * grid].sum())
    peak = np.unravel_index(int(np.argmax(query)), query.shape)
    visuals.fusion_note = (
        f"**Vision layer {stats.fused_layers[slot]}**: attention each high-res token receives from all low-res "
        f"queries ({cells}x{cells} high-res grid). Low-res patch ({row}, {col}) (outlined) puts "
        f"{own_area:.0%} of its attention on its own area; its peak is high-res token {tuple(map(int, peak))} "
        f"({query.max():.3f})."
    )
    visuals.summary["query_attention_own_area"] = own_area


def _contribution_visuals(visuals: Visuals, stats: ShortcutStats, view: Image.Image, slot: int, row: int, col: int):
    side, grid = stats.patches_per_side, stats.high_res_grid
    shares = stats.fusion_contribution[:, -1].numpy()  # (L, P, 1 + G)
    maps = [neighbours_to_grid(shares[j, :, 1:], side, grid) for j in range(len(stats.fused_layers))]
    visuals.fusion_maps = [(v, overlay(view, maps[j])) for j, v in enumerate(stats.fused_layers)]
    visuals.fusion_map = visuals.fusion_maps[slot][1]
    visuals.query_map = mark_cell(visuals.fusion_map, row, col, side)
    patch = shares[slot, row * side + col]
    neighbours = ", ".join(f"{s:.0%}" for s in patch[1:])
    visuals.fusion_note = (
        f"**Vision layer {stats.fused_layers[slot]}** (concat-MLP fusion): share of each high-res token in its "
        f"low-res patch's fused token. Patch ({row}, {col}): low-res token {patch[0]:.0%}, high-res "
        f"neighbours {neighbours} (row-major)."
    )
    visuals.summary["patch_shares"] = [float(s) for s in patch]
