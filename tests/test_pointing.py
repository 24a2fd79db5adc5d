"""The pointing game: scoring a map against an object's box, finding the object a question is about, and the
`sparsecut pointing` command on a tiny random model (well-formed results; no thresholds)."""

import json

import numpy as np
import pytest

from sparsecut.cli import main
from sparsecut.data import shapesworld
from sparsecut.evaluation import pointing
from sparsecut.testing import tiny_model


def test_a_map_hits_when_its_highest_cell_overlaps_the_box():
    box = (0.0, 0.0, 0.2, 0.2)  # the top-left corner: on a 4x4 grid, only cell (0, 0)
    values = np.zeros((4, 4))
    values[0, 0] = 1.0
    assert pointing.pointing_hit(values, box) == 1.0
    values[3, 3] = 2.0
    assert pointing.pointing_hit(values, box) == 0.0
    # A constant map ties everywhere: it scores the share of cells on the box, as a random map does.
    assert pointing.pointing_hit(np.ones((4, 4)), box) == pytest.approx(1 / 16)
    assert pointing.cells_hit(4, box).mean() == pytest.approx(1 / 16)
    assert pointing.pointing_hit(pointing.centre_map(4), (0.4, 0.4, 0.6, 0.6)) == 1.0


def test_the_object_a_question_is_about_is_found_from_its_words():
    scene = shapesworld.sample_scene(shapesworld.scene_rng(0, "pointing-test", 3), min_objects=3)
    for obj in scene.objects:
        others = [o for o in scene.objects if o is not obj]
        if all(o.shape != obj.shape or o.colour != obj.colour for o in others):
            question = f"hey, what pattern is on the {obj.colour} {obj.shape}? be brief."
            assert pointing.referent(scene, question) is obj
    assert pointing.referent(scene, "Is it red, blue or pink?") is None  # several colours: no one object


def test_questions_from_a_file_are_matched_to_their_objects_and_checked_by_their_answers(tmp_path):
    path = shapesworld.generate_dataset(tmp_path, n_images=12, split="test", phrasing="heldout")
    items = pointing.items_from_file(path, per_family=3)
    assert items and {item.family for item in items} <= set(pointing.FAMILIES)
    assert all(sum(1 for i in items if i.family == family) <= 3 for family in pointing.FAMILIES)
    for item in items:
        x0, y0, x1, y1 = item.box
        assert 0 <= (x0 + x1) / 2 <= 1 and 0 <= (y0 + y1) / 2 <= 1 and x1 > x0 and y1 > y0


def test_pointing_on_a_tiny_model_gives_well_formed_results(tmp_path):
    loaded = tiny_model(fusion="concat_mlp")
    summary = pointing.pointing(None, generate=1, loaded=loaded, out_dir=str(tmp_path), max_new_tokens=3)
    assert summary["questions"] == len(pointing.FAMILIES)
    assert set(summary["per_family"]) == set(pointing.FAMILIES)
    expected = {
        "relevance, low-res",
        "relevance, high-res",
        "fusion: high-res shares",
        "random, low-res grid",
        "centre, low-res grid",
        "random, high-res grid",
    }
    assert expected <= set(summary["maps"])
    assert sum(name.startswith("shortcut ratio") for name in summary["maps"]) == loaded[0].config.num_shortcuts
    for name in summary["maps"]:
        rate = summary["all"][name]
        assert rate is None or 0.0 <= rate <= 1.0
    written = json.loads((tmp_path / "pointing.json").read_text())
    assert len(written["records"]) == summary["questions"]
    table = (tmp_path / "pointing.md").read_text()
    assert "| relevance, low-res |" in table and "Hardware:" in table


def test_the_pointing_command_runs_on_a_saved_checkpoint(tmp_path, capsys):
    model, processor = tiny_model(fusion="none")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    main(["pointing", str(tmp_path / "model"), "--generate", "1", "--families", "colour", "--out-dir", str(out)])
    table = (out / "pointing.md").read_text()
    assert "Command: `sparsecut pointing" in table
    assert "relevance, high-res" not in table  # fusion "none" reads no high-res view
    assert "| relevance, low-res |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["pointing", str(tmp_path / "model")])  # neither --data nor --generate
