"""ShapesWorld's vocabulary and scene graph: objects on a 3x3 grid over a background, sampled from a
seeded random stream, and the per-region classification targets of vision pre-training.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import asdict, dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink")
SIZES = ("small", "medium", "large")
PATTERNS = ("solid", "striped", "dotted", "checkered")
REGIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
CHARS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
FAMILIES = ("colour", "shape", "count", "position", "relation", "pattern", "character", "existence", "description")
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


def sample_scene(rng: random.Random, min_objects: int = 1, max_objects: int = 8, char_prob: float = 0.8) -> Scene:
    """Sample a scene. `char_prob` is the chance that an object able to carry a character gets one."""
    n = rng.randint(min_objects, max_objects)
    objects = []
    for r in sorted(rng.sample(range(len(REGIONS)), n)):
        shape, size, pattern = rng.choice(SHAPES), rng.choice(SIZES), rng.choice(PATTERNS)
        can_carry = size == "large" and shape in CHAR_SHAPES
        char = rng.choice(CHARS) if can_carry and rng.random() < char_prob else None
        slack = 1 / 6 - SIZE_RADIUS[size] - _CELL_MARGIN
        row, col = divmod(r, 3)
        objects.append(
            SceneObject(
                shape=shape,
                colour=rng.choice(COLOURS),
                size=size,
                pattern=pattern,
                region=REGIONS[r],
                char=char,
                x=(col + 0.5) / 3 + rng.uniform(-slack, slack),
                y=(row + 0.5) / 3 + rng.uniform(-slack, slack),
                stripes_vertical=pattern == "striped" and rng.random() < 0.5,
            )
        )
    kind = rng.choice(BACKGROUND_KINDS)
    colour = _random_light_colour(rng)
    background = Background(
        kind=kind,
        colour=colour,
        colour2=_random_light_colour(rng) if kind == "gradient" else colour,
        vertical=kind == "gradient" and rng.random() < 0.5,
        seed=rng.getrandbits(32),
    )
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
