"""Linear probes: which object attributes reach the LLM through the image tokens (`sparsecut probe MODEL`).

For every object of a ShapesWorld split, the image token at the low-res patch under the object's centre is read
from each source the LLM receives: the input tokens that replace `<image>`, and each shortcut's added features;
and from what the fusion's projector receives for them, to tell what the projector drops.
A linear classifier per attribute (colour, shape, size, pattern, character, region) is fit on the objects of
the training images and scored on those of the test images. An attribute the probe cannot read from a source
is not there in a linearly readable form, whatever the LLM learns. The README ("Training and evaluation") gives
the measurement that showed a cross-attention fusion averaging the crops' fine detail away.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .build import load_model
from .shapesworld import SceneObject, glyph_cut_by_grid

ATTRIBUTES = ("colour", "shape", "size", "pattern", "char", "region")


def centre_patch(x: float, y: float, side: int) -> int:
    """Row-major index of the patch of a side x side grid that contains the point (x, y) in [0, 1]^2."""
    return min(int(y * side), side - 1) * side + min(int(x * side), side - 1)


@torch.no_grad()
def object_tokens(model, processor, data_dir: str | Path, split: str, n_images: int, batch_size: int = 32):
    """(features, objects) for the objects of the first `n_images` images of `split`: features maps each
    source to a (n_objects, D) tensor; objects are the scene graph's dicts.

    Sources: "projector input" (what the fusion's projector receives for the feature layer: for concat_mlp the
    low-res token with its grid x grid high-res tokens, for cross_attention the attended token, for none the
    low-res token; left out for the appended-tokens baseline), "input" (the LLM input tokens) and
    "shortcut v->l" (each shortcut's added features). Comparing the first two shows what the projector keeps."""
    data_dir = Path(data_dir)
    scenes = json.loads((data_dir / f"{split}_scenes.json").read_text())
    keys = list(scenes)[:n_images]
    config = model.config
    layers = config.fused_vision_layers
    feature_slot = layers.index(config.feature_layer % (config.vision_depth + 1))
    pairs = zip(config.shortcut_vision_layers, config.shortcut_llm_layers)
    names = ["input"] + [f"shortcut {v}->{lm}" for v, lm in pairs]
    keep_projector_input = not config.append_high_res_tokens  # appended tokens are not one per low-res patch
    sources = ["projector input"] * keep_projector_input + names
    features: dict[str, list[torch.Tensor]] = {name: [] for name in sources}
    captured: dict[str, torch.Tensor] = {}
    hook = model.fusion.projector.register_forward_pre_hook(lambda module, args: captured.update(x=args[0]))
    objects = []
    try:
        for start in tqdm(range(0, len(keys), batch_size), desc=f"probe tokens ({split})", unit="batch"):
            chunk = keys[start : start + batch_size]
            pixel_values = processor.preprocess_images([str(data_dir / key) for key in chunk]).to(model.device)
            image = model.get_image_features(pixel_values.to(model.dtype))
            before = captured["x"].view(len(layers), len(chunk), *captured["x"].shape[1:])[feature_slot]
            for row, key in enumerate(chunk):
                for obj in scenes[key]["objects"]:
                    index = centre_patch(obj["x"], obj["y"], config.patches_per_side)
                    if keep_projector_input:
                        features["projector input"].append(before[row, index].float().cpu())
                    features["input"].append(image.inputs[row, index].float().cpu())
                    for k, name in enumerate(names[1:]):
                        features[name].append(image.shortcuts[k, row, index].float().cpu())
                    objects.append(obj)
    finally:
        hook.remove()
    return {name: torch.stack(rows) for name, rows in features.items()}, objects


def probe_predictions(x_train, y_train, x_test, n_classes: int, steps: int = 300, seed: int = 0) -> torch.Tensor:
    """The classes of x_test (n,) predicted by a linear softmax classifier fit (Adam, full batch, standardised
    inputs) on the train split."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(x_train.shape[1], n_classes, generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(x_train @ weight + bias, y_train).backward()
            optimizer.step()
    with torch.no_grad():
        return (x_test @ weight + bias).argmax(-1)


def probe(
    model: str | None = None,
    data: str = "data/shapesworld",
    train_images: int = 1500,
    test_images: int = 600,
    out_dir: str | None = None,
    device: str = "auto",
) -> dict:
    """Probe accuracy per source and attribute, with each attribute's majority-class rate on the test objects
    ("chance"); characters are probed on the objects that carry one, and scored also apart for the glyphs
    that the high-res crops' borders cut ("char cut") and those one crop shows whole ("char whole"). Writes
    probe.json and probe.md to `out_dir` (default: `data`/probe)."""
    loaded, processor = load_model(model, device=device)
    train_x, train_objects = object_tokens(loaded, processor, data, "train", train_images)
    test_x, test_objects = object_tokens(loaded, processor, data, "test", test_images)
    scenes = json.loads((Path(data) / "test_scenes.json").read_text())  # image path -> scene
    with Image.open(Path(data) / next(iter(scenes))) as first:
        image_size = first.width  # ShapesWorld's images are square and all of one size
    grid = loaded.config.high_res_grid
    results: dict = {"objects": {"train": len(train_objects), "test": len(test_objects)}, "chance": {}, "probes": {}}
    for attribute in ATTRIBUTES:
        train_keep = [i for i, o in enumerate(train_objects) if attribute != "char" or o["char"]]
        test_keep = [i for i, o in enumerate(test_objects) if attribute != "char" or o["char"]]
        values = sorted({str(train_objects[i][attribute]) for i in train_keep})
        test_keep = [i for i in test_keep if str(test_objects[i][attribute]) in values]
        if not train_keep or not test_keep:
            continue
        y_train = torch.tensor([values.index(str(train_objects[i][attribute])) for i in train_keep])
        y_test = torch.tensor([values.index(str(test_objects[i][attribute])) for i in test_keep])
        # Characters also apart by whether the high-res crops' borders cut their glyph (`glyph_cut_by_grid`).
        subsets = {attribute: torch.ones(len(test_keep), dtype=torch.bool)}
        if attribute == "char":
            cut = torch.tensor([glyph_cut_by_grid(SceneObject(**test_objects[i]), image_size, grid) for i in test_keep])
            subsets.update({"char whole": ~cut, "char cut": cut})
        subsets = {name: mask for name, mask in subsets.items() if mask.any()}
        for name, mask in subsets.items():
            results["chance"][name] = float(torch.bincount(y_test[mask]).max()) / int(mask.sum())
            if name != attribute:
                results["objects"][name] = int(mask.sum())
        for source in train_x:
            predicted = probe_predictions(train_x[source][train_keep], y_train, test_x[source][test_keep], len(values))
            for name, mask in subsets.items():
                results["probes"].setdefault(source, {})[name] = float((predicted == y_test)[mask].float().mean())
    out = Path(out_dir) if out_dir else Path(data) / "probe"
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(results, indent=2))
    (out / "probe.md").write_text(to_markdown(results))
    return results


def to_markdown(results: dict) -> str:
    attributes = list(results["chance"])
    lines = ["| source | " + " | ".join(attributes) + " |", "|---|" + "---|" * len(attributes)]
    for source, scores in results["probes"].items():
        lines.append(f"| {source} | " + " | ".join(f"{scores[a]:.3f}" for a in attributes) + " |")
    chance = " | ".join(f"{results['chance'][a]:.3f}" for a in attributes)
    lines.append(f"| *chance (majority class)* | {chance} |")
    counts = results["objects"]
    notes = f"\n\nObjects: {counts['train']} to fit, {counts['test']} to score."
    if "char cut" in results["chance"] or "char whole" in results["chance"]:
        notes += (" char whole / char cut: the characters whose glyph one high-res crop shows whole / the crop"
                  " borders cut (same probe, scored apart).")
    return "\n".join(lines) + notes + "\n"
