"""`sparsecut experiment CONFIG.yaml`: train several model variants with one recipe and compare them.

The experiment yaml names a training config (`base`) and the variants, each a set of `SparseCutConfig` overrides
on top of it; every variant then runs the same stages, data, steps and seed, and is scored on the same held-out
split. `stages` overrides stage fields for every variant alike (the shared budget): a key naming a stage holds
that stage's overrides, other keys apply to every stage; `skip_stages` leaves stages of the recipe out for every
variant (a small budget is better spent on the stage that trains the LLM's adapters); `probe` (the arguments of
`sparsecut.evaluation.probe.probe` but the model; `data` relative to the yaml, default ../data/shapesworld) also fits
linear probes on each variant's LLM input tokens and shortcut features, which show what detail reaches the LLM
even where the budget is too small for the LLM to learn to read it. Results go to `output_dir/results.json` and
`results.md`: per-family accuracy and the LLM input tokens of each variant (and the probes).

    # sparsecut experiment configs/compare.yaml
    base: default.yaml
    output_dir: ../runs/compare
    eval: {data: ../data/shapesworld/test.json, limit: 1000}
    stages: {align: {max_steps: 20}, instruct: {max_steps: 80}}
    probe: {train_images: 1000, test_images: 600}
    variants:
      sparsecut: {}
      llava: {fusion: none, high_res_grid: 1, schedule: none, feature_layer: -2, image_token_scale: null}

Variants train one after another and a finished variant is not redone, so an interrupted experiment resumes.
`variants` (`--variants` on the command line) runs only the named ones; the results still table every finished
variant of the yaml, in its order. So variants can run side by side, in several processes on one GPU (a model as
small as the default one keeps a GPU about a quarter busy) or one per GPU, once the data and the stage-0 encoder
they share are in place; a last run without `--variants` tables them all:

    sparsecut experiment configs/compare.yaml --variants llava            # makes the data and stage 0
    for v in sparsecut sparsecut_concat fusion_only shortcuts_only; do
        sparsecut experiment configs/compare.yaml --variants $v &
    done; wait
    sparsecut experiment configs/compare.yaml                              # trains nothing more; the table
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from ..evaluation.evaluate import evaluate
from ..evaluation.probe import probe
from ..utils import markdown_table
from .train import TrainConfig, train

FINE_DETAIL = ("pattern", "character")
"""The ShapesWorld families whose answers are only legible at high resolution."""


def variant_config(
    raw_base: dict, base_dir: Path, name: str, overrides: dict, stages: dict, out: Path, skip: list[str] = ()
) -> TrainConfig:
    """The base training config with a variant's model overrides, the shared stage overrides (keys that name a
    stage hold that stage's overrides; other keys apply to every stage), without the `skip` stages, and with its
    own output directory."""
    raw = dict(raw_base)
    model = dict(raw.get("model", {}))
    model["config"] = {**model.get("config", {}), **(overrides or {})}
    raw["model"] = model
    names = {stage["name"] for stage in raw["stages"]}
    unknown = set(skip) - names
    if unknown or not names - set(skip):
        raise ValueError(f"skip_stages {list(skip)} must name some, not all, of the recipe's stages {sorted(names)}.")
    common = {key: value for key, value in stages.items() if key not in names}
    raw["stages"] = [
        {**stage, **common, **stages.get(stage["name"], {})} for stage in raw["stages"] if stage["name"] not in skip
    ]
    raw["output_dir"] = str(out / name)
    return TrainConfig.from_dict(raw, base_dir)


def summarise(name: str, scores: dict, overrides: dict, probes: dict | None = None) -> dict:
    """One row of the results: per-family accuracy (descriptions: exact), the fine-detail mean, the costs and,
    with `probes` (a `sparsecut.evaluation.probe.probe` result), the probe accuracy per attribute at the LLM input
    tokens and the best over the shortcuts."""
    families = {family: metrics.get("accuracy", metrics.get("exact")) for family, metrics in scores["families"].items()}
    fine = [families[f] for f in FINE_DETAIL if f in families]
    return {
        "variant": name,
        "overrides": overrides,
        "image_tokens": scores["image_tokens"],
        "llm_input_tokens": scores["llm_input_tokens"],
        "families": families,
        "fine_detail": sum(fine) / len(fine) if fine else None,
        "short_answer": scores["overall"]["accuracy"],
        **({"probe": probe_summary(probes)} if probes else {}),
    }


def probe_summary(probes: dict) -> dict:
    """{"input": {attribute: accuracy}, "shortcuts": {attribute: best accuracy over the shortcuts} (empty without
    shortcuts), "chance": {attribute: majority-class rate}}."""
    shortcuts = [scores for source, scores in probes["probes"].items() if source.startswith("shortcut")]
    best = {}
    if shortcuts:
        best = {attribute: max(scores[attribute] for scores in shortcuts) for attribute in probes["chance"]}
    return {"input": probes["probes"]["input"], "shortcuts": best, "chance": probes["chance"]}


def to_markdown(rows: list[dict], baseline: str | None) -> str:
    families = sorted({family for row in rows for family in row["families"]})
    head = ["variant", "image tokens", "LLM input tokens", *families, "fine detail", "short answer"]
    table = []
    for row in rows:
        cells = [row["variant"], str(row["image_tokens"]), f"{row['llm_input_tokens']:.1f}"]
        cells += [f"{100 * row['families'][f]:.1f}" if f in row["families"] else "–" for f in families]
        cells += [
            f"{100 * row['fine_detail']:.1f}" if row["fine_detail"] is not None else "–",
            f"{100 * row['short_answer']:.1f}",
        ]
        table.append(cells)
    lines = [markdown_table(head, table)]
    base = next((row for row in rows if row["variant"] == baseline), None)
    if base is not None and base["fine_detail"] is not None:
        lines.append("")
        for row in rows:
            if row is not base and row["fine_detail"] is not None:
                gain = 100 * (row["fine_detail"] - base["fine_detail"])
                lines.append(f"- {row['variant']}: fine detail {gain:+.1f} points over {baseline}")
    probed = [row for row in rows if "probe" in row]
    if probed:
        lines += ["", *probe_table(probed)]
    return "\n".join(lines) + "\n"


def probe_table(rows: list[dict]) -> list[str]:
    """Markdown lines: each variant's probe accuracy per attribute at the LLM input tokens / best shortcut."""
    attributes = list(rows[0]["probe"]["chance"])
    lines = [
        "Linear probes per object (`sparsecut probe`): accuracy at the LLM input tokens / the best over the",
        "shortcuts' added features (– without shortcuts).",
        "",
    ]
    table = []
    for row in rows:
        found = row["probe"]
        cells = []
        for attribute in attributes:
            shortcut = found["shortcuts"].get(attribute)
            shortcut_text = "–" if shortcut is None else f"{100 * shortcut:.1f}"
            cells.append(f"{100 * found['input'][attribute]:.1f} / {shortcut_text}")
        table.append([row["variant"], *cells])
    table.append(["*chance (majority class)*", *(f"{100 * rows[0]['probe']['chance'][a]:.1f}" for a in attributes)])
    return [*lines, markdown_table(["variant", *attributes], table)]


def saved_or(path: Path, step, *args, **kwargs) -> dict:
    """The JSON a finished step saved at `path`, or the result of `step(*args, **kwargs)`, which saves it there."""
    return json.loads(path.read_text()) if path.is_file() else step(*args, **kwargs)


def experiment(path: str | Path, variants: list[str] | None = None) -> Path:
    """Run the experiment yaml's variants, or only those named in `variants` (training, evaluation, probes if
    asked), and table every finished variant; returns the results.md path."""
    path = Path(path).resolve()
    spec = yaml.safe_load(path.read_text())
    names = list(spec["variants"])
    unknown = [name for name in variants or () if name not in names]
    if unknown:
        raise ValueError(f"{path.name} has no variant {', '.join(unknown)}; its variants: {', '.join(names)}.")
    base_path = (path.parent / spec["base"]).resolve()
    raw_base = yaml.safe_load(base_path.read_text())
    out = (path.parent / spec["output_dir"]).resolve()
    evaluation = dict(spec.get("eval", {}))
    data = str((path.parent / evaluation.pop("data")).resolve())
    out.mkdir(parents=True, exist_ok=True)
    for name in variants or names:
        config = variant_config(
            raw_base,
            base_path.parent,
            name,
            spec["variants"][name],
            spec.get("stages", {}),
            out,
            spec.get("skip_stages", []),
        )
        final = train(config)
        eval_dir = out / name / "eval"
        saved_or(eval_dir / "scores.json", evaluate, str(final), data, str(eval_dir), **evaluation)
        if "probe" in spec:
            settings = dict(spec["probe"])
            settings["data"] = str((path.parent / settings.get("data", "../data/shapesworld")).resolve())
            probe_dir = out / name / "probe"
            saved_or(probe_dir / "probe.json", probe, str(final), out_dir=str(probe_dir), **settings)
        write_results(spec, out, path.name)
    return out / "results.md"


def write_results(spec: dict, out: Path, config_name: str):
    """results.json and results.md under `out`: every variant finished so far, by this process or another."""
    rows = finished_rows(spec, out)
    write_atomically(
        out / "results.json", json.dumps({"command": f"sparsecut experiment {config_name}", "variants": rows}, indent=2)
    )
    write_atomically(out / "results.md", to_markdown(rows, spec.get("baseline")))


def finished_rows(spec: dict, out: Path) -> list[dict]:
    """A results row for each variant of `spec` whose scores (and probes, if the experiment asks for them) are
    saved under `out`, in the yaml's order: also those another process ran."""
    rows = []
    for name, overrides in spec["variants"].items():
        scores, probes = out / name / "eval" / "scores.json", out / name / "probe" / "probe.json"
        if scores.is_file() and ("probe" not in spec or probes.is_file()):
            found = json.loads(probes.read_text()) if "probe" in spec else None
            rows.append(summarise(name, json.loads(scores.read_text()), overrides or {}, found))
    return rows


def write_atomically(path: Path, text: str):
    """Write `text` to `path` through a temporary file, so that processes writing it side by side never leave
    it half written."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)
