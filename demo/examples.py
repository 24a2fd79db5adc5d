"""The demo's example ShapesWorld scenes and questions (assets/examples/), and the script that makes them.

python -m demo.examples   # rewrites assets/examples/*.png and assets/examples/examples.json

One scene per question family, rendered at ShapesWorld's default 128 px; each question's answer is derived
from the scene graph, so the examples double as a check of a trained model (tests/test_app.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
FAMILIES = ("colour", "shape", "count", "character", "pattern")
IMAGE_SIZE = 128


@dataclass(frozen=True)
class Example:
    image: Path
    question: str
    answer: str
    family: str


def make_examples(out_dir: Path = EXAMPLES_DIR, seed: int = 0) -> list[Example]:
    """Render one scene per family in FAMILIES (the first of the "demo" split that supports the family)."""
    from sparsecut.data import shapesworld

    out_dir.mkdir(parents=True, exist_ok=True)
    examples, index = [], 0
    for family in FAMILIES:
        while True:
            rng = shapesworld.scene_rng(seed, "demo", index)
            index += 1
            scene = shapesworld.sample_scene(rng)
            question = shapesworld.make_question(scene, family, rng)
            if question is not None:
                break
        image = out_dir / f"{family}.png"
        shapesworld.render(scene, IMAGE_SIZE).save(image)
        examples.append(Example(image, question.text, shapesworld.answer(scene, question), family))
    records = [{**example.__dict__, "image": example.image.name} for example in examples]
    (out_dir / "examples.json").write_text(json.dumps(records, indent=2) + "\n")
    return examples


def load_examples(directory: Path = EXAMPLES_DIR) -> list[Example]:
    """The examples written by `make_examples` (none if the directory has none)."""
    index = directory / "examples.json"
    if not index.is_file():
        return []
    return [Example(**{**record, "image": directory / record["image"]}) for record in json.loads(index.read_text())]


if __name__ == "__main__":
    for example in make_examples():
        print(f"{example.image}: {example.question} -> {example.answer}")
