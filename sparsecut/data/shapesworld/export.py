"""Writing ShapesWorld splits as LLaVA-format VQA datasets, with each image's scene graph beside them."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from ..llava_format import Sample, save_llava_json
from .phrasing import POOLS, rephrase
from .questions import answer, make_questions
from .rendering import render
from .world import Scene, sample_scene, scene_from_dict, scene_rng, scene_to_dict


def generate_dataset(
    out_dir: str | Path,
    n_images: int,
    seed: int = 0,
    image_size: int = 128,
    questions_per_image: int = 4,
    split: str = "train",
    phrasing: str = "standard",
) -> Path:
    """Render `n_images` scenes and write a LLaVA-format VQA dataset; returns the path of the JSON file.

    Writes `out_dir/images/<split>_<index>.png`, `out_dir/<split>.json` (one question per record, with an
    extra "family" key) and `out_dir/<split>_scenes.json` (each image's scene graph, keyed by image path,
    from which every answer and `scene_labels` can be re-derived). Every image has its own random stream
    (`scene_rng`), so splits never share a scene and image i is the same whatever n_images is.

    `phrasing` "standard" asks each family in its fixed templates (the standard splits); "train" or "heldout"
    asks it in words drawn from that pool of `phrasing` (questions as people ask them), with answers in the
    form asked for (records then also carry "form" and "short", the bare answer).
    """
    if phrasing != "standard" and phrasing not in POOLS:
        raise ValueError(f"phrasing must be 'standard' or one of {POOLS}, got {phrasing!r}")
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
            text, reply, meta = q.text, None, {"family": q.family}
            if phrasing == "standard":
                reply = answer(scene, q)
            else:
                phrased = rephrase(scene, q, rng, phrasing)
                text, reply = phrased.text, phrased.answer
                meta |= {"form": phrased.form, "short": phrased.short}
            samples.append(
                Sample(
                    id=f"{split}_{i:06d}_{j}",
                    image=image_path,
                    turns=[("user", "<image>\n" + text), ("assistant", reply)],
                    meta=meta,
                )
            )
    json_path = out_dir / f"{split}.json"
    save_llava_json(samples, json_path)
    (out_dir / f"{split}_scenes.json").write_text(json.dumps(scenes))
    return json_path


def load_scenes(path: str | Path) -> dict[str, Scene]:
    """Read a `<split>_scenes.json` written by `generate_dataset`: image path -> scene."""
    return {k: scene_from_dict(v) for k, v in json.loads(Path(path).read_text()).items()}
