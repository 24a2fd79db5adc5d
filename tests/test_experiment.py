"""`sparsecut experiment`: variants of one recipe are trained alike, scored alike and tabled."""

import json
import re
from pathlib import Path

import pytest
import yaml
from test_train import TINY_MODEL, shapes  # noqa: F401  (pytest fixture)

from sparsecut.cli import main
from sparsecut.configuration import SparseCutConfig
from sparsecut.training.experiment import variant_config
from sparsecut.training.train import TrainConfig


def write_experiment(tmp_path: Path, shapes, probe: bool = True) -> Path:  # noqa: F811
    """A two-variant experiment (SparseCut, LLaVA-style baseline) of a tiny recipe, 3 steps each; its yaml."""
    train_json, test_json = shapes
    base = {
        "output_dir": "unused",
        "seed": 0,
        "model": TINY_MODEL,
        "stages": [
            {
                "name": "align",
                "data": str(train_json),
                "train": ["fusion", "gates"],
                "max_steps": 50,
                "batch_size": 2,
                "learning_rate": 3e-3,
            }
        ],
    }
    (tmp_path / "base.yaml").write_text("# sparsecut train base.yaml\n" + yaml.safe_dump(base))
    spec = {
        "base": "base.yaml",
        "output_dir": "runs",
        "eval": {"data": str(test_json), "limit": 6, "batch_size": 3, "max_new_tokens": 4},
        "stages": {"align": {"max_steps": 3}, "batch_size": 3},  # the shared budget overrides the base recipe's
        "baseline": "llava",
        **({"probe": {"data": str(train_json.parent), "train_images": 8, "test_images": 4}} if probe else {}),
        "variants": {"sparsecut": {}, "llava": {"fusion": "none", "schedule": "none"}},
    }
    text = "# sparsecut experiment compare.yaml\n" + yaml.safe_dump(spec, sort_keys=False)
    (tmp_path / "compare.yaml").write_text(text)
    return tmp_path / "compare.yaml"


def test_variants_train_with_one_recipe_and_are_tabled(tmp_path, shapes, capsys):  # noqa: F811
    write_experiment(tmp_path, shapes)

    main(["experiment", str(tmp_path / "compare.yaml")])

    results = json.loads((tmp_path / "runs" / "results.json").read_text())
    rows = {row["variant"]: row for row in results["variants"]}
    assert list(rows) == ["sparsecut", "llava"]
    for name, row in rows.items():
        log = (tmp_path / "runs" / name / "align" / "log.jsonl").read_text().splitlines()
        assert len(log) == 3  # the shared budget, not the base's 50 steps
        assert all(0 <= accuracy <= 1 for accuracy in row["families"].values())
        assert (tmp_path / "runs" / name / "eval" / "predictions.jsonl").read_text().count("\n") == 6
    sparsecut = SparseCutConfig.from_pretrained(tmp_path / "runs" / "sparsecut" / "align")
    llava = SparseCutConfig.from_pretrained(tmp_path / "runs" / "llava" / "align")
    assert (sparsecut.fusion, llava.fusion) == ("cross_attention", "none")
    assert sparsecut.shortcut_llm_layers and not llava.shortcut_llm_layers
    # Same input length: the multi-grained features cost no extra LLM tokens.
    assert rows["sparsecut"]["image_tokens"] == rows["llava"]["image_tokens"] == sparsecut.num_image_tokens
    assert rows["sparsecut"]["llm_input_tokens"] == rows["llava"]["llm_input_tokens"] > sparsecut.num_image_tokens
    # Probes of what reaches the LLM: at the input tokens for both, through shortcuts for SparseCut only.
    for name, row in rows.items():
        saved = json.loads((tmp_path / "runs" / name / "probe" / "probe.json").read_text())
        assert row["probe"]["input"] == saved["probes"]["input"]
        assert set(row["probe"]["input"]) == set(row["probe"]["chance"]) >= {"colour", "pattern"}
    shortcut_sources = [s for s in saved_probes(tmp_path, "sparsecut") if s.startswith("shortcut")]
    assert len(shortcut_sources) == len(sparsecut.shortcut_llm_layers) > 0
    best_colour = max(saved_probes(tmp_path, "sparsecut")[s]["colour"] for s in shortcut_sources)
    assert rows["sparsecut"]["probe"]["shortcuts"]["colour"] == best_colour
    assert rows["llava"]["probe"]["shortcuts"] == {}
    table = (tmp_path / "runs" / "results.md").read_text()
    assert "| sparsecut |" in table and "| llava |" in table and "points over llava" in table
    assert "Linear probes" in table and " / –" in table.split("| llava |")[-1]
    out = capsys.readouterr().out
    assert table in out
    assert out.count("3 steps of 3 samples") == 2  # both overrides reached both variants

    # A finished experiment is not redone.
    saved = [tmp_path / "runs" / "llava" / "eval" / "scores.json", tmp_path / "runs" / "llava" / "probe" / "probe.json"]
    before = [path.stat().st_mtime_ns for path in saved]
    main(["experiment", str(tmp_path / "compare.yaml")])
    assert [path.stat().st_mtime_ns for path in saved] == before


def test_variants_run_apart_are_tabled_together(tmp_path, shapes, capsys):  # noqa: F811
    """`--variants` runs some variants (as side-by-side processes would); each run tables every finished one."""
    config = write_experiment(tmp_path, shapes, probe=False)
    runs = tmp_path / "runs"

    main(["experiment", str(config), "--variants", "llava"])
    assert [row["variant"] for row in json.loads((runs / "results.json").read_text())["variants"]] == ["llava"]
    assert not (runs / "sparsecut").exists()
    llava_scores = runs / "llava" / "eval" / "scores.json"
    before = llava_scores.stat().st_mtime_ns

    main(["experiment", str(config), "--variants", "sparsecut"])
    rows = json.loads((runs / "results.json").read_text())["variants"]
    assert [row["variant"] for row in rows] == ["sparsecut", "llava"]  # the yaml's order, the other run's row too
    assert rows[1]["families"] == {
        family: found.get("accuracy", found.get("exact"))
        for family, found in json.loads(llava_scores.read_text())["families"].items()
    }
    assert llava_scores.stat().st_mtime_ns == before  # read, not redone
    table = (runs / "results.md").read_text()
    assert "| sparsecut |" in table and "| llava |" in table and "sparsecut: fine detail" in table
    assert not list(runs.glob(".results*"))  # no temporary files left behind
    capsys.readouterr()

    with pytest.raises(SystemExit):
        main(["experiment", str(config), "--variants", "lava"])
    assert "no variant lava; its variants: sparsecut, llava" in capsys.readouterr().err


def saved_probes(tmp_path, variant: str) -> dict:
    return json.loads((tmp_path / "runs" / variant / "probe" / "probe.json").read_text())["probes"]


def test_skipped_stages_are_left_out_for_every_variant(tmp_path):
    stage = {"data": "train.json", "train": ["fusion", "gates"], "max_steps": 50}
    base = {
        "output_dir": "unused",
        "model": TINY_MODEL,
        "stages": [{"name": "align", **stage}, {"name": "instruct", **stage, "learning_rate": 1e-4}],
    }
    shared = {"instruct": {"max_steps": 7}, "batch_size": 3}

    config = variant_config(base, tmp_path, "llava", {"fusion": "none"}, shared, tmp_path / "runs", ["align"])

    assert [s.name for s in config.stages] == ["instruct"]
    assert (config.stages[0].max_steps, config.stages[0].batch_size, config.stages[0].learning_rate) == (7, 3, 1e-4)
    assert config.output_dir == str(tmp_path / "runs" / "llava")
    for skip in (["align", "instruct"], ["alignment"]):  # all stages, or one the recipe does not have
        with pytest.raises(ValueError, match="skip_stages"):
            variant_config(base, tmp_path, "llava", {}, shared, tmp_path / "runs", skip)


ROOT = Path(__file__).parents[1]
# Recipes, and the configs of runs made once (kept so that they can be run again).
CONFIGS = sorted(ROOT.glob("configs/*.yaml")) + sorted(ROOT.glob("experiments/*/config.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[str(path.relative_to(ROOT)) for path in CONFIGS])
def test_committed_configs_parse_and_their_first_line_runs_them(path):
    """Every stage key and top-level key of a committed recipe is one the trainer knows (a typo would make a
    run fail after its data and stage 0, or silently train with a default)."""
    text = path.read_text()
    raw, command = yaml.safe_load(text), text.splitlines()[0]
    launch = re.fullmatch(r"# accelerate launch --config_file (\S+) -m sparsecut\.cli train (\S+)", command)
    if "distributed_type" in raw:  # an accelerate config: its first line launches a recipe with it
        assert launch and launch[1] == str(path.relative_to(ROOT)) and (ROOT / launch[2]).is_file()
        return
    if launch:  # a recipe for several GPUs, launched with an accelerate config
        assert (ROOT / launch[1]).is_file()
        command = f"# sparsecut train {launch[2]}"
    if "variants" in raw:
        assert command == f"# sparsecut experiment {path.relative_to(ROOT)}"
        base = yaml.safe_load((path.parent / raw["base"]).read_text())
        for name, overrides in raw["variants"].items():
            config = variant_config(
                base,
                path.parent,
                name,
                overrides,
                raw.get("stages", {}),
                path.parent / "runs",
                raw.get("skip_stages", []),
            )
            assert config.stages and config.output_dir.endswith(name)
    else:
        assert command == f"# sparsecut train {path.relative_to(ROOT)}"
        assert TrainConfig.from_dict(raw, path.parent).stages
