"""Rendering a ShapesWorld scene: a coarse layer visible at any resolution plus a fine layer (fill patterns,
printed characters) that the 2x bicubic downsampler removes, and that downsampling itself.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from .world import CHARS, COLOUR_RGB, COLOURS, PATTERNS, SIZE_RADIUS, Background, Scene, SceneObject

# A 5x7 bitmap font ('#' = ink, rows separated by '/'), so rendering never depends on system fonts.
FONT_5X7 = {
    "A": ".###./#...#/#...#/#####/#...#/#...#/#...#",
    "B": "####./#...#/#...#/####./#...#/#...#/####.",
    "C": ".###./#...#/#..../#..../#..../#...#/.###.",
    "D": "###../#..#./#...#/#...#/#...#/#..#./###..",
    "E": "#####/#..../#..../####./#..../#..../#####",
    "F": "#####/#..../#..../####./#..../#..../#....",
    "G": ".###./#...#/#..../#.###/#...#/#...#/.####",
    "H": "#...#/#...#/#...#/#####/#...#/#...#/#...#",
    "I": ".###./..#../..#../..#../..#../..#../.###.",
    "J": "..###/...#./...#./...#./...#./#..#./.##..",
    "K": "#...#/#..#./#.#../##.../#.#../#..#./#...#",
    "L": "#..../#..../#..../#..../#..../#..../#####",
    "M": "#...#/##.##/#.#.#/#.#.#/#...#/#...#/#...#",
    "N": "#...#/#...#/##..#/#.#.#/#..##/#...#/#...#",
    "O": ".###./#...#/#...#/#...#/#...#/#...#/.###.",
    "P": "####./#...#/#...#/####./#..../#..../#....",
    "Q": ".###./#...#/#...#/#...#/#.#.#/#..#./.##.#",
    "R": "####./#...#/#...#/####./#.#../#..#./#...#",
    "S": ".####/#..../#..../.###./....#/....#/####.",
    "T": "#####/..#../..#../..#../..#../..#../..#..",
    "U": "#...#/#...#/#...#/#...#/#...#/#...#/.###.",
    "V": "#...#/#...#/#...#/#...#/#...#/.#.#./..#..",
    "W": "#...#/#...#/#...#/#.#.#/#.#.#/#.#.#/.#.#.",
    "X": "#...#/#...#/.#.#./..#../.#.#./#...#/#...#",
    "Y": "#...#/#...#/.#.#./..#../..#../..#../..#..",
    "Z": "#####/....#/...#./..#../.#.../#..../#####",
    "0": ".###./#...#/#..##/#.#.#/##..#/#...#/.###.",
    "1": "..#../.##../..#../..#../..#../..#../.###.",
    "2": ".###./#...#/....#/...#./..#../.#.../#####",
    "3": "#####/...#./..#../...#./....#/#...#/.###.",
    "4": "...#./..##./.#.#./#..#./#####/...#./...#.",
    "5": "#####/#..../####./....#/....#/#...#/.###.",
    "6": "..##./.#.../#..../####./#...#/#...#/.###.",
    "7": "#####/....#/...#./..#../.#.../.#.../.#...",
    "8": ".###./#...#/#...#/.###./#...#/#...#/.###.",
    "9": ".###./#...#/#...#/.####/....#/...#./.##..",
}


def glyph_bitmap(char: str) -> np.ndarray:
    """The (7, 5) boolean bitmap of a character."""
    return np.array([[c == "#" for c in row] for row in FONT_5X7[char].split("/")], dtype=bool)


def _checker(h: int, w: int) -> np.ndarray:
    """+1/-1 checkerboard of single pixels, +1 at even x + y: the carrier of all fine detail."""
    return np.where(np.add.outer(np.arange(h), np.arange(w)) % 2 == 0, 1.0, -1.0).astype(np.float32)


# Each font dot becomes a 2x2 block of the pixel checkerboard, so a stroke is a band of checkerboard: crisp
# at full resolution, while any 2x2 average of it is zero. A glyph is 10x14 pixels.
_GLYPH_SIGNALS = {c: np.kron(glyph_bitmap(c), np.ones((2, 2), np.float32)) * _checker(14, 10) for c in CHARS}
GLYPH_W, GLYPH_H = 10, 14
_LABEL_GREY = 127.5  # the label behind a character: mid-grey, so the strokes can swing far both ways
_GLYPH_AMPLITUDE = 90.0  # stroke contrast in grey levels either side of the label, with room to spare


def _regular_polygon(n: int, radius: float, start_deg: float) -> tuple[tuple[float, float], ...]:
    angles = [math.radians(start_deg + 360 * k / n) for k in range(n)]
    return tuple((radius * math.cos(a), radius * math.sin(a)) for a in angles)


def _star(inner: float = 0.42) -> tuple[tuple[float, float], ...]:
    radii = [1.0 if k % 2 == 0 else inner for k in range(10)]
    return tuple(
        (r * math.cos(math.radians(-90 + 36 * k)), r * math.sin(math.radians(-90 + 36 * k)))
        for k, r in enumerate(radii)
    )


def _cross(arm: float = 0.34, end: float = 0.95) -> tuple[tuple[float, float], ...]:
    return (
        (-arm, -end),
        (arm, -end),
        (arm, -arm),
        (end, -arm),
        (end, arm),
        (arm, arm),
        (arm, end),
        (-arm, end),
        (-arm, arm),
        (-end, arm),
        (-end, -arm),
        (-arm, -arm),
    )


# Outlines in units of the object's half-extent, y pointing down. The circle is drawn as an ellipse.
_CIRCLE_RADIUS = 0.95
_POLYGONS = {
    "square": ((-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)),
    "triangle": ((0.0, -0.95), (1.0, 0.8), (-1.0, 0.8)),
    "diamond": ((0.0, -1.0), (0.85, 0.0), (0.0, 1.0), (-0.85, 0.0)),
    "star": _star(),
    "hexagon": _regular_polygon(6, 0.95, 0),
    "cross": _cross(),
}
_SUPERSAMPLE = 4  # anti-aliasing of outlines: coverage is averaged over 4x4 samples per pixel
_NOISE_STD = 6.0  # grey levels of the noise background: a visible texture, far weaker than any object edge
_DITHER_STD = 1.0  # grey levels of Gaussian dither added to every image before rounding
_TONE_MARGIN = 20.0  # grey levels pattern tones keep from 0 and 255, room for the projection's corrections


def _is_light(colour: str) -> bool:
    r, g, b = COLOUR_RGB[colour]
    return 0.299 * r + 0.587 * g + 0.114 * b > 130


def _pattern_tones(colour: str, pattern: str) -> tuple[np.ndarray, np.ndarray]:
    """The two tones (on, off) of a pattern. Their coverage-weighted mean is exactly the object colour, so
    averaging the pattern away leaves no trace of which pattern it was."""
    base = np.array(COLOUR_RGB[colour], np.float32)
    if pattern == "solid":
        return base, base
    coverage = 0.25 if pattern == "dotted" else 0.5  # fraction of pixels in the "on" tone
    sign = -1 if _is_light(colour) else 1  # dots and stripes go dark on light colours, light on dark ones
    low, high = base - _TONE_MARGIN, 255 - _TONE_MARGIN - base  # room below and above the colour
    room_on, room_off = (low, high) if sign < 0 else (high, low)
    step = sign * np.maximum(0, np.minimum(room_on, room_off * (1 - coverage) / coverage))
    return base + step, base - step * coverage / (1 - coverage)


_TONES = {(c, p): _pattern_tones(c, p) for c in COLOURS for p in PATTERNS}


def _pattern_mask(obj: SceneObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Which pixels take the "on" tone. Anchored to the image's pixel grid, so that every pattern repeats
    every 2 pixels along both axes and 2x downsampling filters cancel it."""
    x_even, y_even = (xs % 2 == 0)[None, :], (ys % 2 == 0)[:, None]
    if obj.pattern == "striped":
        return np.broadcast_to(x_even if obj.stripes_vertical else y_even, (len(ys), len(xs)))
    if obj.pattern == "checkered":
        return x_even == y_even
    if obj.pattern == "dotted":
        return x_even & y_even
    return np.zeros((len(ys), len(xs)), dtype=bool)


def label_origin(obj: SceneObject, size: int) -> tuple[int, int]:
    """Top-left pixel of the glyph: centred on the object and snapped to even coordinates, so that the
    glyph's 2x2 blocks line up with the pixel pairs a 2x downsample averages."""
    return 2 * round((obj.x * size - GLYPH_W / 2) / 2), 2 * round((obj.y * size - GLYPH_H / 2) / 2)


def glyph_cut_by_grid(obj: SceneObject, image_size: int, grid: int) -> bool:
    """Whether the crop borders of a grid x grid high-res view (the image cut into equal tiles) run through the
    object's glyph, so that no one crop shows all of it. A large object sits in the middle of its cell, so with
    a 2x2 grid every glyph of the middle row or column is cut (docs/shapesworld.md, "Legibility measurement")."""
    if obj.char is None:
        return False
    gx, gy = label_origin(obj, image_size)
    borders = [k * image_size / grid for k in range(1, grid)]
    return any(gx < b < gx + GLYPH_W or gy < b < gy + GLYPH_H for b in borders)


def outline_alpha(obj: SceneObject, size: int) -> tuple[int, int, np.ndarray]:
    """(x0, y0, coverage) of the object's outline: coverage in [0, 1] over the bounding box at (x0, y0)."""
    radius = SIZE_RADIUS[obj.size] * size
    cx, cy = obj.x * size, obj.y * size
    x0, y0 = max(0, math.floor(cx - radius) - 1), max(0, math.floor(cy - radius) - 1)
    x1, y1 = min(size, math.ceil(cx + radius) + 2), min(size, math.ceil(cy + radius) + 2)
    ss = _SUPERSAMPLE
    mask = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
    draw = ImageDraw.Draw(mask)
    if obj.shape == "circle":
        r = _CIRCLE_RADIUS * radius
        draw.ellipse([(cx - r - x0) * ss, (cy - r - y0) * ss, (cx + r - x0) * ss - 1, (cy + r - y0) * ss - 1], fill=255)
    else:
        draw.polygon(
            [((cx + px * radius - x0) * ss, (cy + py * radius - y0) * ss) for px, py in _POLYGONS[obj.shape]], fill=255
        )
    return x0, y0, np.asarray(mask.reduce(ss), dtype=np.float32) / 255


def _render_background(bg: Background, size: int, rng: np.random.Generator) -> np.ndarray:
    start, end = np.array(bg.colour, np.float32), np.array(bg.colour2, np.float32)
    if bg.kind == "gradient":
        ramp = start + np.linspace(0, 1, size, dtype=np.float32)[:, None] * (end - start)  # (size, 3)
        ramp = ramp[:, None] if bg.vertical else ramp[None]
        return np.ascontiguousarray(np.broadcast_to(ramp, (size, size, 3)))
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = start
    if bg.kind == "noise":
        canvas += _NOISE_STD * np.clip(rng.standard_normal((size, size, 1), dtype=np.float32), -2.5, 2.5)
    return canvas


def render_layers(scene: Scene, image_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """The coarse and the fine layer, float32 arrays of shape (image_size, image_size, 3).

    The coarse layer holds the background, the objects in flat colour and the grey character labels. The
    fine layer holds the zero-mean deviations of patterns and glyphs from it, projected onto the null space
    of the 2x bicubic downsampler. The image is their sum.
    """
    if image_size % 2:
        raise ValueError(f"image_size must be even, got {image_size}")
    coarse = _render_background(scene.background, image_size, np.random.default_rng(scene.background.seed))
    fine = np.zeros_like(coarse)
    for obj in scene.objects:
        x0, y0, alpha = outline_alpha(obj, image_size)
        h, w = alpha.shape
        box = np.s_[y0 : y0 + h, x0 : x0 + w]
        colour = np.array(COLOUR_RGB[obj.colour], np.float32)
        coarse[box] += alpha[..., None] * (colour - coarse[box])
        if obj.pattern != "solid":
            on, off = _TONES[(obj.colour, obj.pattern)]
            mask = _pattern_mask(obj, np.arange(x0, x0 + w), np.arange(y0, y0 + h))
            fine[box] += alpha[..., None] * (np.where(mask[..., None], on, off) - colour)
        if obj.char is not None:
            gx, gy = label_origin(obj, image_size)
            # The label is the glyph plus a 1-pixel grey margin that keeps the pattern away from the strokes.
            # From 96 px up it lies inside the outline; below that the outline crops it.
            label = np.s_[gy - 1 : gy + GLYPH_H + 1, gx - 1 : gx + GLYPH_W + 1]
            inside = alpha[gy - 1 - y0 : gy + GLYPH_H + 1 - y0, gx - 1 - x0 : gx + GLYPH_W + 1 - x0, None]
            coarse[label] += inside * (_LABEL_GREY - coarse[label])
            fine[label] = inside * np.pad(_GLYPH_AMPLITUDE * _GLYPH_SIGNALS[obj.char], 1)[..., None]
    if fine.any():
        # Remove the part of the fine layer a 2x bicubic downsample would keep (mostly the traces where
        # patterns and glyphs end). The projection onto that filter's row space is separable: R F R^T.
        # Two plain matrix products (rows, then columns, all channels at once) are the fast way to do it.
        r, n = _downsample_row_projector(image_size), image_size
        rows = (r @ fine.reshape(n, n * 3)).reshape(n, n, 3)
        fine -= (rows.transpose(0, 2, 1).reshape(n * 3, n) @ r.T).reshape(n, 3, n).transpose(0, 2, 1)
    return coarse, fine


def render_array(scene: Scene, image_size: int = 128, fine_detail: bool = True) -> np.ndarray:
    """Render to a (image_size, image_size, 3) uint8 array; `fine_detail=False` leaves the fine layer out."""
    coarse, fine = render_layers(scene, image_size)
    image = coarse + fine if fine_detail else coarse
    # Dither before rounding, so that rounding errors are noise rather than a faint, deterministic copy of
    # the fine layer that a model could learn to read at half resolution. It must be strong enough to also
    # randomise the rounding inside 8-bit resizers (PIL rounds between its horizontal and vertical passes).
    rng = np.random.default_rng(scene.background.seed + 1)
    dither = _DITHER_STD * rng.standard_normal(image.shape, np.float32)
    return np.clip(np.rint(image + dither), 0, 255).astype(np.uint8)


def render(scene: Scene, image_size: int = 128) -> Image.Image:
    """Render to an RGB PIL image of image_size x image_size pixels."""
    return Image.fromarray(render_array(scene, image_size), "RGB")


def downsample(
    image: Image.Image, factor: int = 2, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> Image.Image:
    """The low-resolution view: PIL's bicubic by default, which widens its filter as the image shrinks
    (antialiasing), as do torchvision's and transformers' PIL-based resizes."""
    return image.resize((image.width // factor, image.height // factor), resample)


@lru_cache(maxsize=8)
def _downsample_row_projector(size: int) -> np.ndarray:
    """(size, size) orthogonal projector onto the row space of 1-D 2x bicubic downsampling, as PIL does it.

    Resizing the identity matrix along x gives the filter matrix D (size/2 x size); R = D^T (D D^T)^-1 D.
    """
    identity = Image.fromarray(np.eye(size, dtype=np.float32), "F")
    d = np.asarray(identity.resize((size // 2, size), Image.Resampling.BICUBIC), np.float64).T
    return (d.T @ np.linalg.solve(d @ d.T, d)).astype(np.float32)
