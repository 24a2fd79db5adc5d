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

Modules: `world` (vocabulary, scene graph), `rendering`, `questions` (and answers), `export` (LLaVA-format
splits), `legibility`. The public names of each are importable from here.
"""

from __future__ import annotations

from .export import generate_dataset, load_scenes
from .legibility import legibility_report
from .questions import QuestionSpec, Ref, answer, describe, describe_object, make_question, make_questions, resolve
from .rendering import (
    FONT_5X7,
    GLYPH_H,
    GLYPH_W,
    downsample,
    glyph_bitmap,
    glyph_cut_by_grid,
    label_origin,
    outline_alpha,
    render,
    render_array,
    render_layers,
)
from .world import (
    BACKGROUND_KINDS,
    CHAR_SHAPES,
    CHARS,
    COLOUR_RGB,
    COLOURS,
    FAMILIES,
    LABEL_CLASSES,
    PATTERNS,
    REGIONS,
    SHAPES,
    SIZE_RADIUS,
    SIZES,
    Background,
    Scene,
    SceneObject,
    sample_scene,
    scene_from_dict,
    scene_labels,
    scene_rng,
    scene_to_dict,
)

__all__ = [
    "BACKGROUND_KINDS",
    "CHARS",
    "CHAR_SHAPES",
    "COLOURS",
    "COLOUR_RGB",
    "FAMILIES",
    "FONT_5X7",
    "GLYPH_H",
    "GLYPH_W",
    "LABEL_CLASSES",
    "PATTERNS",
    "REGIONS",
    "SHAPES",
    "SIZES",
    "SIZE_RADIUS",
    "Background",
    "QuestionSpec",
    "Ref",
    "Scene",
    "SceneObject",
    "answer",
    "describe",
    "describe_object",
    "downsample",
    "generate_dataset",
    "glyph_bitmap",
    "glyph_cut_by_grid",
    "label_origin",
    "legibility_report",
    "load_scenes",
    "make_question",
    "make_questions",
    "outline_alpha",
    "render",
    "render_array",
    "render_layers",
    "resolve",
    "sample_scene",
    "scene_from_dict",
    "scene_labels",
    "scene_rng",
    "scene_to_dict",
]
