"""The pointing game: does a map over the image point at the object a question is about?

For a ShapesWorld question about one object (its colour, shape, pattern, character or position), the model
answers, and each map the demo draws is computed for that answer; the map "points" at its highest cell, and
scores a hit when that cell overlaps the object's box (from the scene graph: its centre +- its size's
radius). Ties count as the share of tied cells that hit, so a constant map scores what a random one does.

Maps: the answer relevance's strength (`inspection.relevance`) per low-res patch (the image token and the
shortcuts there) and at the fusion's high-res tokens (high-res grid), as the demo draws them, with two variants
for comparison (image tokens only; signed instead of the magnitude); each shortcut's |added| / |hidden| ratio,
and the fusion map the demo shows (attention received for cross-attention, high-res neighbour shares for
concat-MLP; last fused layer). Chance lines: a random map (the exact expected hit rate: the share of cells
that overlap the box) and a centre map (the cells nearest the image centre).

Questions come from a LLaVA-format file beside its `*_scenes.json` (the object is found from the words of its
referring expression and checked against the expected answer), or are generated in code.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import re
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data import shapesworld
from ..data.shapesworld.questions import _REGION_PHRASE
from ..inspection.relevance import relevance_of_answer, strength
from ..inspection.visuals import high_res_to_grid, neighbours_to_grid
from .metrics import is_correct

FAMILIES = ("colour", "shape", "pattern", "character", "position")
ATTRIBUTE = {"colour": "colour", "shape": "shape", "pattern": "pattern", "character": "char", "position": "region"}


@dataclass
class PointingItem:
    """One question about one object, and where that object is."""

    image: Image.Image
    question: str
    family: str
    short: str  # the expected short answer
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) in fractions of the square image's side


def object_box(obj: shapesworld.SceneObject) -> tuple[float, float, float, float]:
    radius = shapesworld.SIZE_RADIUS[obj.size]
    return obj.x - radius, obj.y - radius, obj.x + radius, obj.y + radius


# --- questions ---------------------------------------------------------------------------------------------
_WORDS = {
    "colour": shapesworld.COLOURS,
    "shape": shapesworld.SHAPES,
    "size": shapesworld.SIZES,
}
_REGIONS = sorted(_REGION_PHRASE.items(), key=lambda item: -len(item[1]))  # longest phrase first


def referent(scene: shapesworld.Scene, question: str) -> shapesworld.SceneObject | None:
    """The one object whose shape, colour, size and region agree with every such word in the question, or None
    (no object, or several)."""
    text = question.lower()
    words = set(re.findall(r"[a-z]+", text))
    wanted = {}
    for attribute, values in _WORDS.items():
        found = [v for v in values if v in words]
        if len(found) > 1:
            return None
        if found:
            wanted[attribute] = found[0]
    for region, phrase in _REGIONS:
        if phrase in text:
            wanted["region"] = region
            break
    matches = [o for o in scene.objects if all(getattr(o, a) == v for a, v in wanted.items())]
    return matches[0] if len(matches) == 1 else None


def items_from_file(path: str | Path, families: Sequence[str] = FAMILIES, per_family: int = 70) -> list[PointingItem]:
    """Up to `per_family` questions of each family from a LLaVA-format file (images and `*_scenes.json` beside
    it), those whose object the question's words single out and whose expected answer is that object's."""
    path = Path(path)
    records = json.loads(path.read_text())
    scenes_file = path.with_name(f"{path.stem.split('-')[0]}_scenes.json")
    scenes = json.loads(scenes_file.read_text())
    taken: dict[str, int] = defaultdict(int)
    items = []
    for record in records:
        family = record.get("family")
        if family not in families or taken[family] >= per_family or record.get("form", "short") != "short":
            continue
        scene = shapesworld.scene_from_dict(scenes[record["image"]])
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        short = record.get("short", record["conversations"][1]["value"])
        obj = referent(scene, question)
        if obj is None or str(getattr(obj, ATTRIBUTE[family])) != short:
            continue
        image = Image.open(path.parent / record["image"]).convert("RGB")
        items.append(PointingItem(image, question, family, short, object_box(obj)))
        taken[family] += 1
    return items


def generated_items(
    n_per_family: int, families: Sequence[str] = FAMILIES, seed: int = 0, pool: str = "heldout"
) -> list[PointingItem]:
    """Questions generated in code (split "pointing"), asked in words from the phrasing `pool`, short form."""
    from ..data.shapesworld.phrasing import rephrase

    items, index = [], 0
    for family in families:
        made = 0
        while made < n_per_family:
            rng = shapesworld.scene_rng(seed, "pointing", index)
            index += 1
            scene = shapesworld.sample_scene(rng)
            spec = shapesworld.make_question(scene, family, rng)
            if spec is None:
                continue
            phrased = rephrase(scene, spec, rng, pool=pool)
            if phrased.form != "short" or phrased.question is None:
                continue
            obj = shapesworld.resolve(scene, phrased.question.ref)
            image = shapesworld.render(scene)
            items.append(PointingItem(image, phrased.text, family, phrased.short, object_box(obj)))
            made += 1
    return items


# --- scoring a map -----------------------------------------------------------------------------------------
def cells_hit(cells: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """(cells, cells) booleans: which cells of a cells x cells grid over the image overlap the box."""
    edges = np.arange(cells + 1) / cells
    x0, y0, x1, y1 = box
    cols = (edges[1:] > x0) & (edges[:-1] < x1)
    rows = (edges[1:] > y0) & (edges[:-1] < y1)
    return rows[:, None] & cols[None, :]


def pointing_hit(values: np.ndarray, box: tuple[float, float, float, float]) -> float:
    """1 if the map's highest cell overlaps the box, else 0 (ties: the share of tied cells that do)."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=-np.inf)
    top = values == values.max()
    return float(cells_hit(values.shape[0], box)[top].mean())


def centre_map(cells: int) -> np.ndarray:
    middle = (np.arange(cells) + 0.5) / cells - 0.5
    return -(middle[:, None] ** 2 + middle[None, :] ** 2)


# --- the game ----------------------------------------------------------------------------------------------
def item_maps(model, processor, item: PointingItem, max_new_tokens: int = 16) -> tuple[str, dict[str, np.ndarray]]:
    """The model's answer to the item, and every map scored for it (name -> (cells, cells) array)."""
    messages = [
        {"role": "user", "content": [{"type": "image", "image": item.image}, {"type": "text", "text": item.question}]}
    ]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    inputs = {name: value.to(model.device) for name, value in inputs.items()}
    with torch.inference_mode():
        sequences = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answer_ids = sequences[0, inputs["input_ids"].shape[1] :].tolist()
    eos = set(np.atleast_1d(model.generation_config.eos_token_id or []).tolist())
    while answer_ids and answer_ids[-1] in eos:
        answer_ids.pop()
    answer = processor.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
    if not answer_ids:
        return answer, {}
    relevance = relevance_of_answer(model, inputs, answer_ids)
    stats = relevance.stats
    side, grid = relevance.patches_per_side, relevance.high_res_grid
    maps = {"relevance, low-res": strength(relevance.low_res_map()).numpy()}
    if (high := relevance.high_res_map()) is not None:
        maps["relevance, high-res"] = strength(high).numpy()
    # Variants the relevance maps were chosen from, for comparison: the image tokens alone, and signed.
    maps["relevance, low-res, image tokens only"] = strength(relevance.low_res_map(shortcuts=False)).numpy()
    maps["relevance, low-res, signed"] = relevance.low_res_map().numpy()
    for k, (v, layer) in enumerate(zip(stats.vision_layers, stats.llm_layers)):
        maps[f"shortcut ratio, vision {v} -> LLM {layer}"] = stats.ratios[k, -1, : side * side].view(side, side).numpy()
    if stats.fusion_attention is not None:
        received = stats.fusion_attention[-1, -1].sum(0).numpy()
        maps["fusion: attention received"] = high_res_to_grid(received, side, grid)
    elif stats.fusion_contribution is not None:
        shares = stats.fusion_contribution[-1, -1, :, 1:].numpy()
        maps["fusion: high-res shares"] = neighbours_to_grid(shares, side, grid)
    return answer, maps


def chance_lines(item: PointingItem, side: int, cells_high: int | None) -> dict[str, float]:
    lines = {
        "random, low-res grid": float(cells_hit(side, item.box).mean()),
        "centre, low-res grid": pointing_hit(centre_map(side), item.box),
    }
    if cells_high:
        lines["random, high-res grid"] = float(cells_hit(cells_high, item.box).mean())
        lines["centre, high-res grid"] = pointing_hit(centre_map(cells_high), item.box)
    return lines


def play(model, processor, items: Sequence[PointingItem], max_new_tokens: int = 16) -> Iterator[dict]:
    """One record per item: its family, answer, whether it is right, and the hit of every map and chance line."""
    config = model.config
    side = config.patches_per_side
    cells_high = side * config.high_res_grid if config.uses_high_res else None
    for item in items:
        if item.image.width != item.image.height:
            raise ValueError("The pointing game needs square ShapesWorld images (boxes are in fractions of the side).")
        answer, maps = item_maps(model, processor, item, max_new_tokens)
        hits = {name: pointing_hit(values, item.box) for name, values in maps.items()}
        yield {
            "family": item.family,
            "question": item.question,
            "expected": item.short,
            "answer": answer,
            "correct": is_correct(answer, item.short),
            "hits": {**hits, **chance_lines(item, side, cells_high)},
        }


def summarise(records: Sequence[dict]) -> dict:
    """Hit rate of every map, per family and over all questions, also over the correctly answered ones only."""
    names = list(dict.fromkeys(name for r in records for name in r["hits"]))
    families = list(dict.fromkeys(r["family"] for r in records))

    def rates(chosen: Sequence[dict]) -> dict:
        return {
            name: (
                float(np.mean(values)) if (values := [r["hits"][name] for r in chosen if name in r["hits"]]) else None
            )
            for name in names
        }

    groups = {family: [r for r in records if r["family"] == family] for family in families}
    return {
        "questions": len(records),
        "answered_correctly": float(np.mean([r["correct"] for r in records])) if records else None,
        "maps": names,
        "all": rates(records),
        "correct_answers": rates([r for r in records if r["correct"]]),
        "per_family": {family: {"questions": len(group), **rates(group)} for family, group in groups.items()},
    }


def to_markdown(summary: dict, command: str = "", hardware: str = "") -> str:
    families = list(summary["per_family"])
    header = ["map", *[f"{f} ({summary['per_family'][f]['questions']})" for f in families], "all", "correct answers"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    for name in summary["maps"]:
        row = [summary["per_family"][f][name] for f in families] + [
            summary["all"][name],
            summary["correct_answers"][name],
        ]
        lines.append(f"| {name} | " + " | ".join(cell(v) for v in row) + " |")
    intro = [
        "# Pointing game",
        "",
        f"{summary['questions']} questions about one object; answered correctly: "
        f"{cell(summary['answered_correctly'])}. "
        "A hit: the map's highest cell overlaps the object's box. Random and centre maps are chance lines.",
    ]
    if command:
        intro += ["", f"Command: `{command}`"]
    if hardware:
        intro += ["", f"Hardware: {hardware}; {summary.get('seconds', 0):.0f} s in all (answer and relevance)."]
    return "\n".join([*intro, "", *lines]) + "\n"


def pointing(
    model: str | None,
    data: str | None = None,
    generate: int | None = None,
    per_family: int = 70,
    families: Sequence[str] = FAMILIES,
    out_dir: str | None = None,
    device: str = "auto",
    quantization: str | None = None,
    seed: int = 0,
    max_new_tokens: int = 16,
    loaded: tuple | None = None,
    command: str = "",
) -> dict:
    """Play the pointing game on `data` (a LLaVA-format file beside its scenes) or on `generate` questions per
    family made in code; write pointing.json and pointing.md (with `command`, the hardware and the time taken) to
    `out_dir` if given. `loaded`: an already loaded (model, processor) pair instead of loading `model`."""
    if (data is None) == (generate is None):
        raise ValueError("Pass exactly one of --data (a question file) and --generate (questions made in code).")
    if loaded is None:
        from ..build import load_model

        loaded = load_model(model, quantization=quantization, device=device)
    model_, processor = loaded
    random.seed(seed)
    items = (
        items_from_file(data, families, per_family) if data is not None else generated_items(generate, families, seed)
    )
    if not items:
        raise ValueError(f"No question about one object of families {list(families)} was found.")
    records, started = [], time.perf_counter()
    for index, record in enumerate(play(model_, processor, items, max_new_tokens), 1):
        records.append(record)
        if index % 25 == 0 or index == len(items):
            print(f"{index}/{len(items)} questions, {time.perf_counter() - started:.0f} s", flush=True)
    summary = summarise(records)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "pointing.json").write_text(json.dumps({"summary": summary, "records": records}, indent=1) + "\n")
        (out / "pointing.md").write_text(to_markdown(summary, command, machine(model_.device)))
    return summary


def machine(device: torch.device) -> str:
    """The hardware in words, e.g. "2-core AMD EPYC 7B13 CPU"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()}-core {name} CPU, float32"
