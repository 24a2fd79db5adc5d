"""ShapesWorld: a synthetic visual-question-answering world generated entirely in code.

A scene is a small scene graph (1-8 objects on a 3x3 grid, plus a background) and it is the single source
of truth: images are rendered from it and every answer is derived from it by `answer`.

Coarse attributes (shape, colour, size, position) are visible at any resolution. Fine detail (the fill
pattern and the printed character) is built to be legible at the full resolution and absent from the
half-resolution view. An image is rendered as a coarse layer plus a fine layer; the fine layer is made of
textures of period 2 pixels (which any symmetric 2x downsampling filter cancels, except near their borders)
and is then projected onto the null space of the 2x bicubic downsampler, which removes the borders' traces
too. So `downsample(render(scene))` shows the coarse layer only, up to 8-bit rounding. `legibility_report`
measures this, for that filter and for others (see docs/shapesworld.md).
"""

from __future__ import annotations

import json
import math
import random
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from sparsecut.llava_format import Sample, save_llava_json

# ----------------------------------------------------------------------------------------------------------
# Vocabulary

SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink")
SIZES = ("small", "medium", "large")
PATTERNS = ("solid", "striped", "dotted", "checkered")
REGIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
CHARS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
FAMILIES = ("colour", "shape", "count", "position", "relation", "pattern", "character", "existence",
            "description")
BACKGROUND_KINDS = ("plain", "gradient", "noise")

# Mid-tone, saturated colours: far from the light, greyish backgrounds, and with room above and below
# every channel so that the two tones of a pattern can average back to exactly this colour.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 45),
    "green": (45, 160, 60),
    "blue": (50, 90, 215),
    "yellow": (225, 195, 40),
    "purple": (135, 60, 185),
    "orange": (240, 130, 35),
    "cyan": (40, 190, 205),
    "pink": (235, 105, 180),
}

# Object half-extent as a fraction of the image side. A grid cell is 1/3 wide, so even a large object
# leaves room to jitter its position inside its cell without coming near a neighbouring cell.
SIZE_RADIUS = {"small": 0.065, "medium": 0.1, "large": 0.14}
_CELL_MARGIN = 0.015  # closest an object may come to the border of its cell

# Characters are printed on a 12x16-pixel label, and only large objects of these shapes have room for it
# at the smallest supported image size (96 px); the tests check that the label stays inside the outline.
CHAR_SHAPES = ("circle", "square", "hexagon")

_REGION_PHRASE = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}

# Stage-0 classification targets (see `scene_labels`); class 0 always means "no object in the region".
LABEL_CLASSES: dict[str, tuple[str, ...]] = {
    "shape": ("empty", *SHAPES),
    "colour": ("empty", *COLOURS),
    "size": ("empty", *SIZES),
    "pattern": ("empty", *PATTERNS),
    "char": ("empty", "none", *CHARS),
}

# ----------------------------------------------------------------------------------------------------------
# Scene graph


@dataclass(frozen=True)
class SceneObject:
    """One object. Geometry is in fractions of the image side, so a scene renders at any image size."""

    shape: str
    """One of SHAPES."""
    colour: str
    """One of COLOURS."""
    size: str
    """One of SIZES."""
    pattern: str
    """One of PATTERNS."""
    region: str
    """The cell of the 3x3 grid that holds the object; at most one object per cell."""
    char: str | None
    """The printed character (one of CHARS), or None. Only large objects of CHAR_SHAPES carry one."""
    x: float
    """Centre, as a fraction of the image width (jittered inside the cell)."""
    y: float
    """Centre, as a fraction of the image height."""
    stripes_vertical: bool = False
    """Stripe orientation; only meaningful for the striped pattern (always False otherwise)."""


@dataclass(frozen=True)
class Background:
    """The backdrop: always light and greyish, so it never looks like an object colour."""

    kind: str
    """One of BACKGROUND_KINDS."""
    colour: tuple[int, int, int]
    """Base colour (start colour of a gradient)."""
    colour2: tuple[int, int, int]
    """End colour of a gradient; equal to `colour` for the other kinds."""
    vertical: bool = False
    """Whether a gradient runs top to bottom (otherwise left to right)."""
    seed: int = 0
    """Seed of the per-pixel randomness: the noise of the noise kind and the dither every image gets."""


@dataclass(frozen=True)
class Scene:
    """A whole scene: what `render` draws and what `answer` reads."""

    objects: tuple[SceneObject, ...]
    """The objects, in REGIONS order (reading order), which is also the order of `describe`."""
    background: Background
    """The backdrop."""


def scene_to_dict(scene: Scene) -> dict:
    """A JSON-serialisable dict of the scene (inverse of `scene_from_dict`)."""
    return asdict(scene)


def scene_from_dict(d: dict) -> Scene:
    """Rebuild a scene from `scene_to_dict` output, also after a JSON round trip (tuples become lists)."""
    bg = d["background"]
    background = Background(**{**bg, "colour": tuple(bg["colour"]), "colour2": tuple(bg["colour2"])})
    return Scene(objects=tuple(SceneObject(**o) for o in d["objects"]), background=background)


def scene_rng(seed: int, split: str, index: int) -> random.Random:
    """The random stream of one image. Mixing the split name into the seed keeps splits disjoint by
    construction: the streams of "train" and "test" never coincide, whatever the base seeds."""
    state = np.random.SeedSequence([seed, zlib.crc32(split.encode()), index]).generate_state(2)
    return random.Random(int(state[0]) << 32 | int(state[1]))


def _random_light_colour(rng: random.Random) -> tuple[int, int, int]:
    # Light and greyish, but not so light that noise or the fine layer's fringes often clip at 255.
    grey = rng.uniform(185, 220)
    return tuple(round(grey + rng.uniform(-15, 15)) for _ in range(3))


def sample_scene(rng: random.Random, min_objects: int = 1, max_objects: int = 8,
                 char_prob: float = 0.8) -> Scene:
    """Sample a scene. `char_prob` is the chance that an object able to carry a character gets one."""
    n = rng.randint(min_objects, max_objects)
    objects = []
    for r in sorted(rng.sample(range(len(REGIONS)), n)):
        shape, size, pattern = rng.choice(SHAPES), rng.choice(SIZES), rng.choice(PATTERNS)
        can_carry = size == "large" and shape in CHAR_SHAPES
        char = rng.choice(CHARS) if can_carry and rng.random() < char_prob else None
        slack = 1 / 6 - SIZE_RADIUS[size] - _CELL_MARGIN
        row, col = divmod(r, 3)
        objects.append(SceneObject(
            shape=shape, colour=rng.choice(COLOURS), size=size, pattern=pattern, region=REGIONS[r], char=char,
            x=(col + 0.5) / 3 + rng.uniform(-slack, slack), y=(row + 0.5) / 3 + rng.uniform(-slack, slack),
            stripes_vertical=pattern == "striped" and rng.random() < 0.5))
    kind = rng.choice(BACKGROUND_KINDS)
    colour = _random_light_colour(rng)
    background = Background(kind=kind, colour=colour,
                            colour2=_random_light_colour(rng) if kind == "gradient" else colour,
                            vertical=kind == "gradient" and rng.random() < 0.5, seed=rng.getrandbits(32))
    return Scene(objects=tuple(objects), background=background)


def scene_labels(scene: Scene) -> dict[str, np.ndarray]:
    """Per-region classification targets for pretraining a vision encoder (stage 0).

    Returns, for each key of LABEL_CLASSES, an int64 array of shape (9,) in REGIONS order whose values index
    LABEL_CLASSES[key]: 0 means the region is empty, and for "char" 1 means an object without a character.
    """
    labels = {key: np.zeros(len(REGIONS), dtype=np.int64) for key in LABEL_CLASSES}
    for obj in scene.objects:
        r = REGIONS.index(obj.region)
        for key in ("shape", "colour", "size", "pattern"):
            labels[key][r] = LABEL_CLASSES[key].index(getattr(obj, key))
        labels["char"][r] = LABEL_CLASSES["char"].index(obj.char if obj.char else "none")
    return labels


# ----------------------------------------------------------------------------------------------------------
# Rendering

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
_GLYPH_W, _GLYPH_H = 10, 14
_LABEL_GREY = 127.5  # the label behind a character: mid-grey, so the strokes can swing far both ways
_GLYPH_AMPLITUDE = 90.0  # stroke contrast in grey levels either side of the label, with room to spare


def _regular_polygon(n: int, radius: float, start_deg: float) -> tuple[tuple[float, float], ...]:
    angles = [math.radians(start_deg + 360 * k / n) for k in range(n)]
    return tuple((radius * math.cos(a), radius * math.sin(a)) for a in angles)


def _star(inner: float = 0.42) -> tuple[tuple[float, float], ...]:
    radii = [1.0 if k % 2 == 0 else inner for k in range(10)]
    return tuple((r * math.cos(math.radians(-90 + 36 * k)), r * math.sin(math.radians(-90 + 36 * k)))
                 for k, r in enumerate(radii))


def _cross(arm: float = 0.34, end: float = 0.95) -> tuple[tuple[float, float], ...]:
    return ((-arm, -end), (arm, -end), (arm, -arm), (end, -arm), (end, arm), (arm, arm), (arm, end),
            (-arm, end), (-arm, arm), (-end, arm), (-end, -arm), (-arm, -arm))


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


def _label_origin(obj: SceneObject, size: int) -> tuple[int, int]:
    """Top-left pixel of the glyph: centred on the object and snapped to even coordinates, so that the
    glyph's 2x2 blocks line up with the pixel pairs a 2x downsample averages."""
    return 2 * round((obj.x * size - _GLYPH_W / 2) / 2), 2 * round((obj.y * size - _GLYPH_H / 2) / 2)


def glyph_cut_by_grid(obj: SceneObject, image_size: int, grid: int) -> bool:
    """Whether the crop borders of a grid x grid high-res view (the image cut into equal tiles) run through the
    object's glyph, so that no one crop shows all of it. A large object sits in the middle of its cell, so with
    a 2x2 grid every glyph of the middle row or column is cut (docs/shapesworld.md, "Legibility measurement")."""
    if obj.char is None:
        return False
    gx, gy = _label_origin(obj, image_size)
    borders = [k * image_size / grid for k in range(1, grid)]
    return any(gx < b < gx + _GLYPH_W or gy < b < gy + _GLYPH_H for b in borders)


def _outline_alpha(obj: SceneObject, size: int) -> tuple[int, int, np.ndarray]:
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
        draw.ellipse([(cx - r - x0) * ss, (cy - r - y0) * ss, (cx + r - x0) * ss - 1, (cy + r - y0) * ss - 1],
                     fill=255)
    else:
        draw.polygon([((cx + px * radius - x0) * ss, (cy + py * radius - y0) * ss)
                      for px, py in _POLYGONS[obj.shape]], fill=255)
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
        x0, y0, alpha = _outline_alpha(obj, image_size)
        h, w = alpha.shape
        box = np.s_[y0:y0 + h, x0:x0 + w]
        colour = np.array(COLOUR_RGB[obj.colour], np.float32)
        coarse[box] += alpha[..., None] * (colour - coarse[box])
        if obj.pattern != "solid":
            on, off = _TONES[(obj.colour, obj.pattern)]
            mask = _pattern_mask(obj, np.arange(x0, x0 + w), np.arange(y0, y0 + h))
            fine[box] += alpha[..., None] * (np.where(mask[..., None], on, off) - colour)
        if obj.char is not None:
            gx, gy = _label_origin(obj, image_size)
            # The label is the glyph plus a 1-pixel grey margin that keeps the pattern away from the strokes.
            # From 96 px up it lies inside the outline; below that the outline crops it.
            label = np.s_[gy - 1:gy + _GLYPH_H + 1, gx - 1:gx + _GLYPH_W + 1]
            inside = alpha[gy - 1 - y0:gy + _GLYPH_H + 1 - y0, gx - 1 - x0:gx + _GLYPH_W + 1 - x0, None]
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


def downsample(image: Image.Image, factor: int = 2,
               resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
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


# ----------------------------------------------------------------------------------------------------------
# Questions and answers


@dataclass(frozen=True)
class Ref:
    """A referring expression: it denotes the objects whose attributes equal every non-None field."""

    shape: str | None = None
    """Required shape, or None for any."""
    colour: str | None = None
    """Required colour, or None for any."""
    size: str | None = None
    """Required size, or None for any."""
    region: str | None = None
    """Required region, or None for any."""

    def matches(self, obj: SceneObject) -> bool:
        return ((self.shape is None or obj.shape == self.shape)
                and (self.colour is None or obj.colour == self.colour)
                and (self.size is None or obj.size == self.size)
                and (self.region is None or obj.region == self.region))

    def noun(self, plural: bool = False) -> str:
        """e.g. "large red circle", "red objects" (no article, no region)."""
        noun = self.shape or "object"
        if plural:
            noun = "crosses" if noun == "cross" else noun + "s"
        return " ".join(w for w in (self.size, self.colour, noun) if w)

    def definite(self) -> str:
        """e.g. "the large red circle on the left"."""
        return " ".join(["the", self.noun()] + ([_REGION_PHRASE[self.region]] if self.region else []))

    def indefinite(self) -> str:
        """e.g. "an orange circle" (regions are never used in indefinite references)."""
        noun = self.noun()
        return ("an " if noun[0] in "aeiou" else "a ") + noun


@dataclass(frozen=True)
class QuestionSpec:
    """A question, structured so that `answer` can derive its answer from any scene graph."""

    family: str
    """One of FAMILIES."""
    text: str
    """The question as asked."""
    ref: Ref | None = None
    """The object asked about (for count and existence: the set of objects counted or sought)."""
    ref2: Ref | None = None
    """relation only: the object `ref` is compared with."""
    relation: str | None = None
    """relation only: "left", "right", "above" or "below" (yes/no) or "left/right", "above/below" (which)."""


_TEMPLATES = {
    "colour": ("What colour is {ref}?", "What is the colour of {ref}?", "Which colour does {ref} have?",
               "Name the colour of {ref}."),
    "shape": ("What shape is {ref}?", "What is the shape of {ref}?", "Which shape does {ref} have?",
              "What kind of shape is {ref}?"),
    "count": ("How many {np} are there?", "How many {np} are in the image?", "Count the {np}.",
              "What is the number of {np}?"),
    "position": ("Where is {ref}?", "In which part of the image is {ref}?", "Where in the image is {ref}?",
                 "Which region contains {ref}?"),
    "relation": ("Is {ref} {rel} {ref2}?", "Is it true that {ref} is {rel} {ref2}?",
                 "Does {ref} appear {rel} {ref2}?"),
    "relation_which": ("Is {ref} {choice} {ref2}?", "Relative to {ref2}, is {ref} {choice_alone}?",
                       "Compared with {ref2}, is {ref} {choice_alone}?"),
    "pattern": ("What pattern does {ref} have?", "What is the fill pattern of {ref}?", "How is {ref} filled?",
                "Which pattern is on {ref}?"),
    "character": ("What character is printed on {ref}?", "Which letter or digit is written on {ref}?",
                  "What is the character on {ref}?", "Read the character printed on {ref}."),
    "existence": ("Is there {ind} in the image?", "Does the image contain {ind}?", "Can you see {ind}?",
                  "Is there {ind}?"),
    "description": ("Describe the image.", "Describe every object in the image.",
                    "List all the objects in the image.",
                    "What objects are in this image? Describe each one."),
}
_RELATION_PHRASE = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_CHOICE_PHRASE = {"left/right": "to the left or to the right of", "above/below": "above or below"}
# The same choice where no object follows it ("Relative to the star, is the circle to the left or to the right?").
_CHOICE_ALONE = {"left/right": "to the left or to the right", "above/below": "above or below"}
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
# Attributes a referring expression may use, per family: never the attribute being asked about, never the
# region when the question is about positions, and never fine detail (pattern, character), so that only
# the fine-detail families need fine detail.
_REF_ATTRS = {
    "colour": ("shape", "size", "region"),
    "shape": ("colour", "size", "region"),
    "pattern": ("shape", "colour", "size", "region"),
    "character": ("shape", "colour", "size", "region"),
    "position": ("shape", "colour", "size"),
    "relation": ("shape", "colour", "size"),
}
_VALUES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES}


def _grid(obj: SceneObject) -> tuple[int, int]:
    """(row, column) of the object's region."""
    return divmod(REGIONS.index(obj.region), 3)


def resolve(scene: Scene, ref: Ref) -> SceneObject:
    """The one object `ref` denotes; ValueError if it denotes none or several."""
    found = [o for o in scene.objects if ref.matches(o)]
    if len(found) != 1:
        raise ValueError(f"{ref} denotes {len(found)} objects, not exactly one")
    return found[0]


def describe_object(obj: SceneObject) -> str:
    """Canonical description of one object, e.g. "a large red striped circle with the letter K at the top"."""
    text = f"a {obj.size} {obj.colour} {obj.pattern} {obj.shape}"
    if obj.char is not None:
        text += f" with the {'digit' if obj.char.isdigit() else 'letter'} {obj.char}"
    return f"{text} at the {obj.region}"


def describe(scene: Scene) -> str:
    """Canonical description of a scene: every object, in reading order, separated by "; "."""
    return "; ".join(describe_object(o) for o in scene.objects)


def answer(scene: Scene, q: QuestionSpec) -> str:
    """The answer to `q`, derived from the scene graph alone."""
    if q.family == "description":
        return describe(scene)
    if q.family == "count":
        return str(sum(q.ref.matches(o) for o in scene.objects))
    if q.family == "existence":
        return "yes" if any(q.ref.matches(o) for o in scene.objects) else "no"
    obj = resolve(scene, q.ref)
    if q.family == "relation":
        (row, col), (row2, col2) = _grid(obj), _grid(resolve(scene, q.ref2))
        if q.relation == "left/right" and col != col2:
            return "left" if col < col2 else "right"
        if q.relation == "above/below" and row != row2:
            return "above" if row < row2 else "below"
        holds = {"left": col < col2, "right": col > col2, "above": row < row2, "below": row > row2}
        if q.relation not in holds:
            raise ValueError(f"cannot answer {q.relation!r} for objects on the same line")
        return "yes" if holds[q.relation] else "no"
    attribute = {"colour": "colour", "shape": "shape", "position": "region", "pattern": "pattern",
                 "character": "char"}[q.family]
    value = getattr(obj, attribute)
    if value is None:
        raise ValueError(f"{q.ref} carries no character")
    return value


def _unique_ref(scene: Scene, obj: SceneObject, attrs: tuple[str, ...], rng: random.Random) -> Ref | None:
    """A referring expression that denotes `obj` and nothing else, using only `attrs`; None if none exists.

    Uses a smallest distinguishing set of attributes, sometimes plus one redundant attribute (people do
    say "the red circle" when there is only one circle), which keeps it unambiguous.
    """
    for k in range(len(attrs) + 1):
        subsets = list(combinations(attrs, k))
        rng.shuffle(subsets)
        for subset in subsets:
            ref = Ref(**{a: getattr(obj, a) for a in subset})
            if sum(ref.matches(o) for o in scene.objects) == 1:
                spare = [a for a in attrs if a not in subset and a != "region"]
                if spare and rng.random() < 0.5:
                    extra = rng.choice(spare)
                    ref = Ref(**{a: getattr(obj, a) for a in (*subset, extra)})
                return ref
    return None


def _about_one_object(scene: Scene, family: str, rng: random.Random) -> QuestionSpec | None:
    candidates = [o for o in scene.objects if family != "character" or o.char is not None]
    rng.shuffle(candidates)
    for obj in candidates:
        ref = _unique_ref(scene, obj, _REF_ATTRS[family], rng)
        if ref is not None:
            text = rng.choice(_TEMPLATES[family]).format(ref=ref.definite())
            return QuestionSpec(family=family, text=_capitalise(text), ref=ref)
    return None


def _capitalise(text: str) -> str:
    return text[0].upper() + text[1:]


def _count_question(scene: Scene, rng: random.Random) -> QuestionSpec:
    attrs = rng.choice(((), ("colour",), ("shape",), ("size",), ("colour", "shape"), ("size", "shape")))
    # Mostly count something that is there; sometimes something random, which may well be absent (answer 0).
    if rng.random() < 0.75:
        source = rng.choice(scene.objects)
        ref = Ref(**{a: getattr(source, a) for a in attrs})
    else:
        ref = Ref(**{a: rng.choice(_VALUES[a]) for a in attrs})
    text = rng.choice(_TEMPLATES["count"]).format(np=ref.noun(plural=True))
    return QuestionSpec(family="count", text=text, ref=ref)


def _existence_question(scene: Scene, rng: random.Random) -> QuestionSpec | None:
    """POPE-style: half the questions ask about an absent object. Negatives are adversarial: a present object
    with one attribute changed, or the attributes of two present objects recombined, so they are plausible."""
    want_present = rng.random() < 0.5
    for _ in range(20):
        attrs = rng.choice((("shape",), ("colour", "shape"), ("colour", "shape"),
                            ("size", "colour", "shape")))
        source = rng.choice(scene.objects)
        values = {a: getattr(source, a) for a in attrs}
        if not want_present:
            changed = rng.choice(attrs)
            other = rng.choice(scene.objects)
            use_other = (other is not source and getattr(other, changed) != values[changed]
                         and rng.random() < 0.5)
            values[changed] = getattr(other, changed) if use_other else rng.choice(_VALUES[changed])
        ref = Ref(**values)
        if any(ref.matches(o) for o in scene.objects) == want_present:
            text = rng.choice(_TEMPLATES["existence"]).format(ind=ref.indefinite())
            return QuestionSpec(family="existence", text=text, ref=ref)
    return None


def _relation_question(scene: Scene, rng: random.Random) -> QuestionSpec | None:
    pairs = [(a, b) for a in scene.objects for b in scene.objects if a is not b]
    rng.shuffle(pairs)
    for a, b in pairs[:12]:
        ref, ref2 = (_unique_ref(scene, o, _REF_ATTRS["relation"], rng) for o in (a, b))
        if ref is None or ref2 is None:
            continue
        (row, col), (row2, col2) = _grid(a), _grid(b)
        axes = [ax for ax, differs in (("horizontal", col != col2), ("vertical", row != row2)) if differs]
        axis = rng.choice(axes)
        if rng.random() < 0.5:
            relation = "left/right" if axis == "horizontal" else "above/below"
            text = rng.choice(_TEMPLATES["relation_which"]).format(
                ref=ref.definite(), ref2=ref2.definite(), choice=_CHOICE_PHRASE[relation],
                choice_alone=_CHOICE_ALONE[relation])
        else:
            true_relation = ("left" if col < col2 else "right") if axis == "horizontal" else \
                ("above" if row < row2 else "below")
            # Ask about the true relation or its opposite with equal odds, so yes and no are balanced.
            relation = true_relation if rng.random() < 0.5 else _OPPOSITE[true_relation]
            text = rng.choice(_TEMPLATES["relation"]).format(
                ref=ref.definite(), ref2=ref2.definite(), rel=_RELATION_PHRASE[relation])
        return QuestionSpec(family="relation", text=_capitalise(text), ref=ref, ref2=ref2, relation=relation)
    return None


def make_question(scene: Scene, family: str, rng: random.Random) -> QuestionSpec | None:
    """A random question of `family` about `scene`, or None if the scene offers none (e.g. no characters)."""
    if family == "description":
        return QuestionSpec(family=family, text=rng.choice(_TEMPLATES["description"]))
    if family == "count":
        return _count_question(scene, rng)
    if family == "existence":
        return _existence_question(scene, rng)
    if family == "relation":
        return _relation_question(scene, rng) if len(scene.objects) > 1 else None
    return _about_one_object(scene, family, rng)


def make_questions(scene: Scene, n: int, rng: random.Random,
                   asked: Counter | None = None) -> list[QuestionSpec]:
    """Up to `n` different questions about `scene`.

    Families are balanced across a dataset through `asked` (family -> number asked so far, updated in
    place): each question takes the least-asked family that the scene supports.
    """
    asked = Counter() if asked is None else asked
    questions: list[QuestionSpec] = []
    for _ in range(n):
        for family in sorted(FAMILIES, key=lambda f: asked[f]):
            q = make_question(scene, family, rng)
            # Phrasing aside, never ask the same thing twice about one image.
            if q is not None and all(replace(q, text="") != replace(p, text="") for p in questions):
                questions.append(q)
                asked[family] += 1
                break
    return questions


# ----------------------------------------------------------------------------------------------------------
# Dataset export


def generate_dataset(out_dir: str | Path, n_images: int, seed: int = 0, image_size: int = 128,
                     questions_per_image: int = 4, split: str = "train") -> Path:
    """Render `n_images` scenes and write a LLaVA-format VQA dataset; returns the path of the JSON file.

    Writes `out_dir/images/<split>_<index>.png`, `out_dir/<split>.json` (one question per record, with an
    extra "family" key) and `out_dir/<split>_scenes.json` (each image's scene graph, keyed by image path,
    from which every answer and `scene_labels` can be re-derived). Every image has its own random stream
    (`scene_rng`), so splits never share a scene and image i is the same whatever n_images is.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    samples, scenes, asked = [], {}, Counter()
    for i in tqdm(range(n_images), desc=f"ShapesWorld {split}", unit="img"):
        rng = scene_rng(seed, split, i)
        scene = sample_scene(rng)
        image_path = f"images/{split}_{i:06d}.png"
        render(scene, image_size).save(out_dir / image_path, compress_level=1)
        scenes[image_path] = scene_to_dict(scene)
        for j, q in enumerate(make_questions(scene, questions_per_image, rng, asked)):
            samples.append(Sample(id=f"{split}_{i:06d}_{j}", image=image_path,
                                  turns=[("user", "<image>\n" + q.text), ("assistant", answer(scene, q))],
                                  meta={"family": q.family}))
    json_path = out_dir / f"{split}.json"
    save_llava_json(samples, json_path)
    (out_dir / f"{split}_scenes.json").write_text(json.dumps(scenes))
    return json_path


def load_scenes(path: str | Path) -> dict[str, Scene]:
    """Read a `<split>_scenes.json` written by `generate_dataset`: image path -> scene."""
    return {k: scene_from_dict(v) for k, v in json.loads(Path(path).read_text()).items()}


def generate(out_dir: str, n_images: int = 1000, seed: int = 0, image_size: int = 128, split: str = "train",
             questions_per_image: int = 4) -> str:
    """Command-line entry point: generate one split of ShapesWorld into `out_dir`.

    Returns the path of the LLaVA JSON file written.
    """
    return str(generate_dataset(out_dir, n_images, seed=seed, image_size=image_size,
                                questions_per_image=questions_per_image, split=split))


# ----------------------------------------------------------------------------------------------------------
# Legibility measurement

_DIRECTIONS = ((1, 0), (0, 1), (1, 1), (1, -1))
_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "box": Image.Resampling.BOX, "lanczos": Image.Resampling.LANCZOS,
            "nearest": Image.Resampling.NEAREST}


def _texture_features(lum: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean absolute luminance difference between neighbouring pixels inside `mask`, along 4 directions."""
    h, w = lum.shape
    features = []
    for dx, dy in _DIRECTIONS:
        top, bottom = max(0, -dy), h - max(0, dy)
        a, b = np.s_[top:bottom, 0:w - dx], np.s_[top + dy:bottom + dy, dx:w]
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
    gx, gy = _label_origin(obj, image_size)
    if factor == 1:
        return np.s_[gy:gy + _GLYPH_H, gx:gx + _GLYPH_W]
    return np.s_[gy // 2 - 1:(gy + _GLYPH_H) // 2 + 1, gx // 2 - 1:(gx + _GLYPH_W) // 2 + 1]


def _glyph_templates(image_size: int, resample: Image.Resampling) -> dict[int, np.ndarray]:
    """Per view (factor 1 or 2), an array (n_chars, n_pixels): each character as that view shows it, on a
    large square in the middle of a plain image, rendered and downsampled like the data."""
    templates: dict[int, list[np.ndarray]] = {1: [], 2: []}
    for c in CHARS:
        obj = SceneObject(shape="square", colour="blue", size="large", pattern="solid", region="center",
                          char=c, x=0.5, y=0.5)
        scene = Scene(objects=(obj,), background=Background("plain", (210, 210, 210), (210, 210, 210)))
        full = render(scene, image_size)
        for factor, view in ((1, full), (2, downsample(full, 2, resample))):
            templates[factor].append(_luminance(view)[_glyph_window(obj, image_size, factor)].ravel())
    return {f: _normalised(np.stack(t)) for f, t in templates.items()}


def legibility_report(image_size: int = 128, seed: int = 0, n_scenes: int = 200,
                      half_filter: str = "bicubic", high_res_grid: int = 2) -> dict[str, float]:
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
            x0, y0, alpha = _outline_alpha(obj, image_size)
            inside = np.zeros((image_size, image_size), bool)
            inside[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]] = alpha >= 1
            if obj.char is not None:
                n_glyphs += 1
                gx, gy = _label_origin(obj, image_size)
                inside[gy - 2:gy + _GLYPH_H + 2, gx - 2:gx + _GLYPH_W + 2] = False
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
    report: dict[str, float] = {"image_size": image_size, "scenes": n_scenes, "objects": len(labels),
                                "glyphs": n_glyphs}
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
    """(_GLYPH_H, _GLYPH_W) mask of the glyph pixels that fall in the grid x grid crop holding most of them."""
    rows = (np.arange(gy, gy + _GLYPH_H) * grid) // image_size
    cols = (np.arange(gx, gx + _GLYPH_W) * grid) // image_size
    tile = rows[:, None] * grid + cols[None, :]
    return tile == np.bincount(tile.ravel()).argmax()
