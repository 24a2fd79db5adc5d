"""Linear probes of the image tokens (`sparsecut probe`)."""

import json

import torch

from sparsecut.probe import centre_patch, fit_probe, probe


def test_centre_patch_is_the_patch_under_the_point():
    assert centre_patch(0.0, 0.0, 8) == 0
    assert centre_patch(0.99, 0.0, 8) == 7
    assert centre_patch(0.5, 0.5, 8) == 4 * 8 + 4
    assert centre_patch(1.0, 1.0, 8) == 63  # the far edge belongs to the last patch


def test_a_probe_reads_what_is_there_and_not_what_is_not():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=generator)
    noise = torch.randn(400, 16, generator=generator)
    carries = noise.clone()
    carries[torch.arange(400), labels] += 3.0  # each class raises a channel of its own: linearly readable
    assert fit_probe(carries[:300], labels[:300], carries[300:], labels[300:], 4) > 0.9
    assert fit_probe(noise[:300], labels[:300], noise[300:], labels[300:], 4) < 0.45  # chance: 0.25


def test_probe_scores_every_source_and_attribute(tmp_path, monkeypatch):
    from sparsecut import probe as probe_module
    from sparsecut.shapesworld import generate_dataset
    from sparsecut.testing import tiny_model

    for split, n in (("train", 12), ("test", 6)):
        generate_dataset(tmp_path, n_images=n, seed=0, image_size=64, questions_per_image=1, split=split)
    model, processor = tiny_model(schedule="uniform:2")
    monkeypatch.setattr(probe_module, "load_model", lambda *args, **kwargs: (model, processor))
    results = probe(data=str(tmp_path), train_images=12, test_images=6, out_dir=str(tmp_path / "out"))
    sources = ["input"] + [f"shortcut {v}->{lm}" for v, lm in
                           zip(model.config.shortcut_vision_layers, model.config.shortcut_llm_layers)]
    assert list(results["probes"]) == sources
    scenes = json.loads((tmp_path / "test_scenes.json").read_text())
    assert results["objects"]["test"] == sum(len(scene["objects"]) for scene in scenes.values())
    for scores in results["probes"].values():
        assert {"colour", "shape", "region"} <= set(scores) and all(0.0 <= v <= 1.0 for v in scores.values())
    assert json.loads((tmp_path / "out" / "probe.json").read_text()) == results
    assert "| input |" in (tmp_path / "out" / "probe.md").read_text()
