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
from .relevance import Relevance, strength

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


BAR_HEIGHT = 34  # the colour bar and its labels under a map
TILE_SIZE = 200  # each map of a row of maps (`map_row`)
TITLE_HEIGHT = 22


def colour_bar(width: int, low: float, high: float, colormap: int, unit: str = "") -> np.ndarray:
    """A horizontal colour bar with its low and high values: (BAR_HEIGHT, width, 3) uint8 RGB."""
    ramp = np.tile(np.linspace(0, 255, width).astype(np.uint8), (12, 1))
    colours = cv2.applyColorMap(ramp, colormap)[..., ::-1]
    picture = Image.new("RGB", (width, BAR_HEIGHT), "white")
    picture.paste(Image.fromarray(np.ascontiguousarray(colours)), (0, 4))
    draw = ImageDraw.Draw(picture)
    font, ink = _font(12), (30, 30, 30)
    draw.text((2, 18), f"{low:.3g}{unit} (low)", fill=ink, font=font)
    draw.text((width - 2, 18), f"(high) {high:.3g}{unit}", fill=ink, font=font, anchor="ra")
    return np.asarray(picture)


def with_colour_bar(picture: np.ndarray, values: np.ndarray, colormap: int, unit: str = "") -> np.ndarray:
    """A map with the colour bar of its values underneath (the map keeps its pixels, so clicks map as before)."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    return np.concatenate([picture, colour_bar(picture.shape[1], low, high, colormap, unit)], axis=0)


def map_row(tiles: list[tuple[str, np.ndarray, np.ndarray, int]], tile: int = TILE_SIZE) -> np.ndarray:
    """Maps side by side in one row, each with its title above and its colour bar below: tiles are (title,
    picture, the values it shows, colormap)."""
    gap = 8
    width = len(tiles) * tile + (len(tiles) - 1) * gap
    row = Image.new("RGB", (max(width, 1), TITLE_HEIGHT + tile + BAR_HEIGHT), "white")
    draw = ImageDraw.Draw(row)
    for index, (title, picture, values, colormap) in enumerate(tiles):
        left = index * (tile + gap)
        draw.text((left + tile // 2, 4), title, fill=(30, 30, 30), font=_font(13), anchor="ma")
        row.paste(Image.fromarray(picture).resize((tile, tile), Image.Resampling.BILINEAR), (left, TITLE_HEIGHT))
        bar = with_colour_bar(np.zeros((0, tile, 3), np.uint8), values, colormap)
        row.paste(Image.fromarray(bar), (left, TITLE_HEIGHT + tile))
    return np.asarray(row)


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
    draw.text(
        (12, 10), "How much each shortcut changes the image tokens (|added| / |hidden|)", fill=ink, font=_font(16)
    )
    means = shortcut_means(stats, image_index)
    if not means:
        draw.text((12, height // 2), "This model has no shortcuts.", fill=ink, font=_font(15))
        return np.asarray(picture)
    top, bottom, bar_left, bar_right = 44, height - 34, 250, width - 70
    row_height = min(72.0, (bottom - top) / len(means))
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
    """The panels beside an answer. Maps are (VIEW_SIZE, VIEW_SIZE, 3) uint8, the chart CHART_SIZE; the
    `*_panel` and `*_row` pictures are what the demo shows: maps with their colour bars, rows of maps."""

    chart: np.ndarray | None = None
    shortcut_map: np.ndarray | None = None
    fusion_maps: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (vision layer, map), fused layers
    fusion_map: np.ndarray | None = None  # the selected layer's map
    query_map: np.ndarray | None = None  # what the chosen low-res patch shows (it changes with the patch)
    relevance_maps: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (grid, map): low-res, high-res
    shortcut_panel: np.ndarray | None = None  # shortcut_map with its colour bar
    query_panel: np.ndarray | None = None  # query_map with its colour bar
    patch_picker: np.ndarray | None = None  # the selected layer's fusion map, chosen patch outlined, colour bar
    fusion_row: np.ndarray | None = None  # every fused layer's map in one row, with colour bars
    relevance_row: np.ndarray | None = None  # the relevance maps in one row, with colour bars
    shortcut_note: str = ""  # markdown explaining the shortcut map
    fusion_note: str = ""  # markdown explaining the fusion maps
    relevance_note: str = ""  # markdown explaining the relevance maps
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


NO_IMAGE = "The latest answer had no image, so there is nothing to show."


def render_visuals(
    answer: InspectedAnswer | None,
    shortcut: int = 0,
    vision_layer: int | None = None,
    row: int = 0,
    col: int = 0,
    relevance: Relevance | None = None,
) -> Visuals:
    """Everything the demo shows about `answer`, for the chosen shortcut, fused vision layer (None: the last
    fused layer) and low-res query patch (row, col); with `relevance` (of this answer, `inspection.relevance`)
    also where the answer came from."""
    if answer is None or answer.stats is None or answer.view is None:
        return Visuals(shortcut_note=NO_IMAGE, fusion_note=NO_IMAGE, relevance_note=NO_IMAGE)
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
        visuals.shortcut_panel = with_colour_bar(visuals.shortcut_map, ratios, RATIO_COLORMAP)
        visuals.shortcut_note = (
            f"How much **{shortcut_label(stats.vision_layers[shortcut], stats.llm_layers[shortcut])}** changes "
            "what the language model holds at each image patch, compared with what is already there: bright "
            f"patches change most (from {np.nanmin(ratios):.3f} to {np.nanmax(ratios):.3f} times the size of "
            "the hidden state). <sub>mean ‖added‖ / ‖hidden‖ per image token</sub>"
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
            "This model does not fuse the high-res view: the language model sees the low-res image tokens only, "
            "as in LLaVA-1.5. <sub>fusion = none</sub>"
        )
    _relevance_visuals(visuals, relevance, view)
    return visuals


def _relevance_visuals(visuals: Visuals, relevance: Relevance | None, view: Image.Image) -> None:
    if relevance is None:
        visuals.relevance_note = "Where the answer came from is worked out once the answer is complete."
        return
    grids = [("image tokens", strength(relevance.low_res_map()).numpy())]
    if (high := relevance.high_res_map()) is not None:
        grids.append(("high-res tokens", strength(high).numpy()))
    tiles = []
    for name, values in grids:
        picture = overlay(view, values, ATTENTION_COLORMAP)
        visuals.relevance_maps.append((name, picture))
        tiles.append((f"{name} ({values.shape[0]}x{values.shape[1]})", picture, values, ATTENTION_COLORMAP))
    visuals.relevance_row = map_row(tiles, tile=VIEW_SIZE // 2 + 64)
    peak = np.unravel_index(int(np.argmax(grids[0][1])), grids[0][1].shape)
    visuals.relevance_note = (
        "**How to read this:** bright patches are the parts of the picture the answer rests on: changing them "
        "would change how sure the model is of its answer the most (either way); dark ones hardly matter. Left: "
        "the image tokens the language model reads (with the shortcuts added at them); right: the finer "
        "high-res tokens fused into them. How often the brightest patch lies on the object a question is about: "
        "`sparsecut pointing` (benchmarks/results/pointing/pointing.md). "
        f"<sub>|gradient × input| of log p(answer) = {float(relevance.logprob[0]):.2f}; brightest image token: "
        f"row {peak[0]}, column {peak[1]}</sub>"
    )
    visuals.summary["relevance"] = {
        "logprob": float(relevance.logprob[0]),
        "image_tokens": grids[0][1].tolist(),
        "high_res_tokens": None if high is None else grids[1][1].tolist(),
    }


def _layer_maps(visuals: Visuals, stats: ShortcutStats, view: Image.Image, maps, slot: int, row: int, col: int):
    """One map per fused layer over the view (`maps`: (layers, cells, cells)), the chosen layer's with the patch
    (row, col) marked for picking, and all of them in one row with colour bars."""
    side = stats.patches_per_side
    visuals.fusion_maps = [(v, overlay(view, maps[j])) for j, v in enumerate(stats.fused_layers)]
    visuals.fusion_map = visuals.fusion_maps[slot][1]
    visuals.patch_picker = with_colour_bar(
        mark_cell(visuals.fusion_map, row, col, side), maps[slot], ATTENTION_COLORMAP
    )
    visuals.fusion_row = map_row(
        [
            (f"vision layer {v}", picture, maps[j], ATTENTION_COLORMAP)
            for j, (v, picture) in enumerate(visuals.fusion_maps)
        ]
    )


def _attention_visuals(visuals: Visuals, stats: ShortcutStats, view: Image.Image, slot: int, row: int, col: int):
    side, grid = stats.patches_per_side, stats.high_res_grid
    attention = stats.fusion_attention[:, -1].numpy()  # (L, P, G*P)
    received = high_res_to_grid(attention.sum(axis=1), side, grid)  # (L, cells, cells): mass each key receives
    _layer_maps(visuals, stats, view, received, slot, row, col)
    query = high_res_to_grid(attention[slot, row * side + col], side, grid)  # (cells, cells)
    visuals.query_map = mark_cell(overlay(view, query), row, col, side)
    visuals.query_panel = with_colour_bar(visuals.query_map, query, ATTENTION_COLORMAP)
    own_area = float(query[row * grid : (row + 1) * grid, col * grid : (col + 1) * grid].sum())
    peak = np.unravel_index(int(np.argmax(query)), query.shape)
    visuals.fusion_note = (
        "**Attention.** Each image token (one per low-res patch) looks into the high-res crops and takes in what "
        "it attends to. The row shows, per fused vision layer, how much attention each high-res patch receives "
        "from all image tokens (bright: looked at often). The large map shows where the chosen patch "
        f"(row {row}, column {col}, outlined; click another) looked: {own_area:.0%} of its attention stays in its "
        f"own area; its peak is high-res patch {tuple(map(int, peak))}. <sub>cross-attention weights, averaged "
        f"over heads; vision layer {stats.fused_layers[slot]}</sub>"
    )
    visuals.summary["query_attention_own_area"] = own_area


def zoom_on_patch(view: Image.Image, shares: np.ndarray, row: int, col: int, side: int, grid: int) -> np.ndarray:
    """The area of low-res patch (row, col), enlarged, with each of its grid x grid high-res tokens coloured and
    labelled by its share: (VIEW_SIZE, VIEW_SIZE, 3). shares: (1 + grid*grid,), the low-res token's first."""
    square = view.convert("RGB").resize((VIEW_SIZE, VIEW_SIZE), Image.Resampling.BICUBIC)
    cell = VIEW_SIZE / side
    area = square.crop((round(col * cell), round(row * cell), round((col + 1) * cell), round((row + 1) * cell)))
    neighbours = np.asarray(shares[1:], dtype=np.float32).reshape(grid, grid)
    picture = Image.fromarray(overlay(area, neighbours))
    draw = ImageDraw.Draw(picture)
    step = VIEW_SIZE / grid
    for r in range(grid):
        for c in range(grid):
            x, y = (c + 0.5) * step, (r + 0.5) * step
            draw.text(
                (x, y),
                f"{neighbours[r, c]:.0%}",
                fill="white",
                font=_font(28),
                anchor="mm",
                stroke_width=3,
                stroke_fill="black",
            )
    draw.text(
        (8, 8),
        f"patch ({row}, {col}); its own low-res token: {shares[0]:.0%}",
        fill="white",
        font=_font(16),
        stroke_width=2,
        stroke_fill="black",
    )
    return np.asarray(picture)


def _contribution_visuals(visuals: Visuals, stats: ShortcutStats, view: Image.Image, slot: int, row: int, col: int):
    side, grid = stats.patches_per_side, stats.high_res_grid
    shares = stats.fusion_contribution[:, -1].numpy()  # (L, P, 1 + G)
    maps = [neighbours_to_grid(shares[j, :, 1:], side, grid) for j in range(len(stats.fused_layers))]
    _layer_maps(visuals, stats, view, maps, slot, row, col)
    patch = shares[slot, row * side + col]
    visuals.query_map = zoom_on_patch(view, patch, row, col, side, grid)
    visuals.query_panel = with_colour_bar(visuals.query_map, patch[1:], ATTENTION_COLORMAP)
    neighbours = ", ".join(f"{s:.0%}" for s in patch[1:])
    visuals.fusion_note = (
        "**This model's fusion does not attend anywhere:** it glues each image token to the "
        f"{grid * grid} high-res tokens of its own patch and mixes them with a small network; the maps show how "
        "big a part of that mix each high-res token is (bright: a large part). This is how the fusion mixes, not "
        "where the answer came from (see that tab). Click a patch to see its "
        f"{grid}x{grid} high-res tokens close up: patch (row {row}, column {col}) takes {patch[0]:.0%} from its "
        f"own low-res token and {neighbours} from its high-res tokens. <sub>concat-MLP: each input's share of "
        f"the first projector layer's pre-activation norm; vision layer {stats.fused_layers[slot]}</sub>"
    )
    visuals.summary["patch_shares"] = [float(s) for s in patch]
