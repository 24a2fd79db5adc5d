"""`sparsecut experiment`: variants of one recipe are trained alike, scored alike and tabled."""

import json

import yaml
from test_train import TINY_MODEL, shapes  # noqa: F401  (pytest fixture)

from sparsecut.cli import main
from sparsecut.configuration import SparseCutConfig


def test_variants_train_with_one_recipe_and_are_tabled(tmp_path, shapes, capsys):  # noqa: F811
    train_json, test_json = shapes
    base = {
        "output_dir": "unused",
        "seed": 0,
        "model": TINY_MODEL,
        "stages": [{"name": "align", "data": str(train_json), "train": ["fusion", "gates"], "max_steps": 50,
                    "batch_size": 2, "learning_rate": 3e-3}],
    }
    (tmp_path / "base.yaml").write_text("# sparsecut train base.yaml\n" + yaml.safe_dump(base))
    spec = {
        "base": "base.yaml",
        "output_dir": "runs",
        "eval": {"data": str(test_json), "limit": 6, "batch_size": 3, "max_new_tokens": 4},
        "stages": {"align": {"max_steps": 3}, "batch_size": 3},  # the shared budget overrides the base recipe's
        "baseline": "llava",
        "variants": {"sparsecut": {}, "llava": {"fusion": "none", "schedule": "none"}},
    }
    text = "# sparsecut experiment compare.yaml\n" + yaml.safe_dump(spec, sort_keys=False)
    (tmp_path / "compare.yaml").write_text(text)

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
    table = (tmp_path / "runs" / "results.md").read_text()
    assert "| sparsecut |" in table and "| llava |" in table and "points over llava" in table
    out = capsys.readouterr().out
    assert table in out
    assert out.count("3 steps of 3 samples") == 2  # both overrides reached both variants

    # A finished experiment is not redone.
    before = (tmp_path / "runs" / "llava" / "eval" / "scores.json").stat().st_mtime_ns
    main(["experiment", str(tmp_path / "compare.yaml")])
    assert (tmp_path / "runs" / "llava" / "eval" / "scores.json").stat().st_mtime_ns == before
