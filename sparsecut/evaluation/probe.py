"""Linear probes: which object attributes reach the LLM through the image tokens (`sparsecut probe MODEL`).

For every object of a ShapesWorld split, the image token at the low-res patch under the object's centre is read
from each source the LLM receives: the input tokens that replace `<image>`, and each shortcut's added features;
and from what the fusion's projector receives for them, to tell what the projector drops.
A linear classifier per attribute (colour, shape, size, pattern, character, region) is fit on the objects of
the training images and scored on those of the test images. An attribute the probe cannot read from a source
is not there in a linearly readable form, whatever the LLM learns. docs/findings.md gives
the measurement that showed a cross-attention fusion averaging the crops' fine detail away.

`llm_probe` (`sparsecut probe --llm`) follows the attribute a question asks for through the LLM: for questions
of the attribute families, the hidden state of every few layers is read at the asked-about object's image token
and at the position that predicts the answer, and a linear probe per layer and family tells where the answer is
(still) there and where it is lost.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..build import load_model
from ..data.llava_format import load_llava_json, sample_to_messages
from ..data.shapesworld import SceneObject, glyph_cut_by_grid
from ..utils import markdown_table

ATTRIBUTES = ("colour", "shape", "size", "pattern", "char", "region")
# The question families whose answer is an attribute value of the object asked about.
FAMILY_ATTRIBUTE = {"colour": "colour", "shape": "shape", "pattern": "pattern", "character": "char"}


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
                    # Copies: on the CPU, .float().cpu() of a float32 tensor is a view that would keep the whole
                    # batch's features alive (8,000 images then took more than 24 GB).
                    if keep_projector_input:
                        features["projector input"].append(before[row, index].to("cpu", torch.float32, copy=True))
                    features["input"].append(image.inputs[row, index].to("cpu", torch.float32, copy=True))
                    for k, name in enumerate(names[1:]):
                        features[name].append(image.shortcuts[k, row, index].to("cpu", torch.float32, copy=True))
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
    probe.json and probe.md to `out_dir` (default: `data`/probe). Characters have 36 classes and only some
    objects carry one, so their probes need many more training images than the other attributes: on the
    default model, 1,500 images (747 glyphs) read them at 0.66 at the projector input, 8,000 (4,132) at 0.86."""
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


@torch.no_grad()
def question_states(
    model,
    processor,
    data_dir: str | Path,
    split: str,
    family: str,
    n_questions: int,
    layers: list[int],
    batch_size: int = 24,
) -> dict:
    """The LLM's hidden states for the first `n_questions` questions of `family` in `split`: "object" and
    "answer" (n, len(layers), D), at the image token under the centre of an object that the answer is true of
    (the one asked about, or one alike) and at the last prompt position (the one that predicts the answer);
    "answers": the n reference answers. `layers` index the decoder's hidden states: 0 is the input embeddings
    (image tokens included), k the output of decoder layer k (the last after the final norm, as the LM head
    reads it)."""
    data_dir = Path(data_dir)
    scenes = json.loads((data_dir / f"{split}_scenes.json").read_text())
    samples = load_llava_json(str(data_dir / f"{split}.json"), image_root=str(data_dir))
    samples = [sample for sample in samples if sample.meta.get("family") == family][:n_questions]
    if not samples:
        raise ValueError(f"{data_dir / f'{split}.json'} has no {family} questions to probe with.")
    attribute, side = FAMILY_ATTRIBUTE[family], model.config.patches_per_side
    states: dict[str, list[torch.Tensor]] = {"object": [], "answer": []}
    answers = []
    for start in tqdm(range(0, len(samples), batch_size), desc=f"LLM states ({split}, {family})", unit="batch"):
        chunk = samples[start : start + batch_size]
        inputs = processor.apply_chat_template(
            [sample_to_messages(sample)[:1] for sample in chunk],
            images=[[sample.image] for sample in chunk],
            tokenize=True,
            add_generation_prompt=True,
            return_dict=True,
            padding_side="left",
        ).to(model.device)
        output = model(**inputs, output_hidden_states=True, logits_to_keep=1)
        hidden = torch.stack([output.hidden_states[layer] for layer in layers], 1).float().cpu()  # (B, L, T, D)
        for row, sample in enumerate(chunk):
            answer = sample.turns[1][1]
            scene = scenes[Path(sample.image).relative_to(data_dir).as_posix()]
            obj = next((o for o in scene["objects"] if str(o[attribute]) == answer), None)
            if obj is None:
                raise ValueError(f"Question {sample.id}: no object in its scene has {attribute} {answer!r}.")
            image_positions = (inputs["input_ids"][row] == model.config.image_token_id).nonzero()[:, 0]  # (P,)
            position = image_positions[centre_patch(obj["x"], obj["y"], side)]
            states["object"].append(hidden[row, :, position])
            states["answer"].append(hidden[row, :, -1])  # left padding: every row's prompt ends at -1
            answers.append(answer)
    return {**{name: torch.stack(rows) for name, rows in states.items()}, "answers": answers}


def llm_probe(
    model: str | None = None,
    data: str = "data/shapesworld",
    families: list[str] | None = None,
    train_questions: int = 1000,
    test_questions: int = 400,
    layers: list[int] | None = None,
    out_dir: str | None = None,
    device: str = "auto",
) -> dict:
    """Probe accuracy per LLM layer, question family and position ("object": the asked-about object's image
    token; "answer": the position that predicts the answer), with each family's majority-class rate on the
    test questions ("chance"). The linear probes are fit on the first `train_questions` questions of each
    family in the train split and scored on the first `test_questions` of the test split. `layers`
    (hidden-state indices, 0 = the input embeddings) default to every 4th layer and the last. Writes
    llm_probe.json and llm_probe.md to `out_dir` (default: `data`/probe)."""
    loaded, processor = load_model(model, device=device)
    depth = loaded.config.text_config.num_hidden_layers
    layers = layers if layers is not None else sorted({*range(0, depth + 1, 4), depth})
    if not all(0 <= layer <= depth for layer in layers):
        raise ValueError(f"layers must lie in [0, {depth}] (0 is the input embeddings), got {layers}.")
    families = families or list(FAMILY_ATTRIBUTE)
    unknown = sorted(set(families) - set(FAMILY_ATTRIBUTE))
    if unknown:
        raise ValueError(f"Cannot probe families {unknown}: the LLM probe follows {sorted(FAMILY_ATTRIBUTE)}.")
    results: dict = {"layers": layers, "questions": {}, "chance": {}, "probes": {}}
    for family in families:
        train = question_states(loaded, processor, data, "train", family, train_questions, layers)
        test = question_states(loaded, processor, data, "test", family, test_questions, layers)
        values = sorted(set(train["answers"]))
        keep = [i for i, answer in enumerate(test["answers"]) if answer in values]
        if not keep:
            raise ValueError(f"No test {family} question in {data} has an answer seen in training.")
        y_train = torch.tensor([values.index(answer) for answer in train["answers"]])
        y_test = torch.tensor([values.index(test["answers"][i]) for i in keep])
        results["questions"][family] = {"train": len(y_train), "test": len(y_test)}
        results["chance"][family] = float(torch.bincount(y_test).max()) / len(y_test)
        for position in ("object", "answer"):
            for k, layer in enumerate(layers):
                predicted = probe_predictions(train[position][:, k], y_train, test[position][keep, k], len(values))
                accuracy = float((predicted == y_test).float().mean())
                results["probes"].setdefault(str(layer), {})[f"{family} {position}"] = accuracy
    out = Path(out_dir) if out_dir else Path(data) / "probe"
    out.mkdir(parents=True, exist_ok=True)
    (out / "llm_probe.json").write_text(json.dumps(results, indent=2))
    (out / "llm_probe.md").write_text(llm_probe_markdown(results))
    return results


def llm_probe_markdown(results: dict) -> str:
    columns = list(next(iter(results["probes"].values())))
    rows = [[layer, *(f"{scores[column]:.3f}" for column in columns)] for layer, scores in results["probes"].items()]
    chance = [results["chance"][column.rsplit(" ", 1)[0]] for column in columns]
    rows.append(["*chance (majority class)*", *(f"{c:.3f}" for c in chance)])
    lines = [markdown_table(["LLM layer", *columns], rows)]
    counts = ", ".join(f"{family} {n['train']} / {n['test']}" for family, n in results["questions"].items())
    return (
        "\n".join(lines) + "\n\nLayer 0: the input embeddings; k: the output of decoder layer k. object: the"
        " hidden state at the image token under the asked-about object's centre; answer: at the last prompt"
        f" position, which predicts the answer. Questions to fit / to score: {counts}.\n"
    )


def to_markdown(results: dict) -> str:
    attributes = list(results["chance"])
    rows = [[source, *(f"{scores[a]:.3f}" for a in attributes)] for source, scores in results["probes"].items()]
    rows.append(["*chance (majority class)*", *(f"{results['chance'][a]:.3f}" for a in attributes)])
    lines = [markdown_table(["source", *attributes], rows)]
    counts = results["objects"]
    notes = f"\n\nObjects: {counts['train']} to fit, {counts['test']} to score."
    if "char cut" in results["chance"] or "char whole" in results["chance"]:
        notes += (
            " char whole / char cut: the characters whose glyph one high-res crop shows whole / the crop"
            " borders cut (same probe, scored apart)."
        )
    return "\n".join(lines) + notes + "\n"
