"""Linear probes of the image tokens (`sparsecut probe`)."""

import json
from pathlib import Path

import pytest
import torch

from sparsecut.evaluation.probe import centre_patch, probe, probe_predictions


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

    def accuracy(x):
        return float((probe_predictions(x[:300], labels[:300], x[300:], 4) == labels[300:]).float().mean())

    assert accuracy(carries) > 0.9
    assert accuracy(noise) < 0.45  # chance: 0.25


def probed(tmp_path, monkeypatch, train_images: int, test_images: int):
    """(model, results) of `probe` over a fresh 64 px ShapesWorld and a tiny random model."""
    from sparsecut.data.shapesworld import generate_dataset
    from sparsecut.evaluation import probe as probe_module
    from sparsecut.testing import tiny_model

    for split, n in (("train", train_images), ("test", test_images)):
        generate_dataset(tmp_path, n_images=n, seed=0, image_size=64, questions_per_image=1, split=split)
    model, processor = tiny_model(schedule="uniform:2")
    monkeypatch.setattr(probe_module, "load_model", lambda *args, **kwargs: (model, processor))
    return model, probe(
        data=str(tmp_path), train_images=train_images, test_images=test_images, out_dir=str(tmp_path / "out")
    )


def test_probe_scores_every_source_and_attribute(tmp_path, monkeypatch):
    model, results = probed(tmp_path, monkeypatch, 12, 6)
    sources = ["projector input", "input"] + [
        f"shortcut {v}->{lm}" for v, lm in zip(model.config.shortcut_vision_layers, model.config.shortcut_llm_layers)
    ]
    assert list(results["probes"]) == sources
    scenes = json.loads((tmp_path / "test_scenes.json").read_text())
    assert results["objects"]["test"] == sum(len(scene["objects"]) for scene in scenes.values())
    for scores in results["probes"].values():
        assert {"colour", "shape", "region"} <= set(scores) and all(0.0 <= v <= 1.0 for v in scores.values())
    assert json.loads((tmp_path / "out" / "probe.json").read_text()) == results
    assert "| input |" in (tmp_path / "out" / "probe.md").read_text()


def test_projector_input_is_the_feature_layers_low_res_token_with_its_high_res_neighbours(tmp_path):
    from sparsecut.data.shapesworld import generate_dataset
    from sparsecut.evaluation.probe import centre_patch, object_tokens
    from sparsecut.testing import tiny_model
    from sparsecut.vision import encode_layers

    generate_dataset(tmp_path, n_images=3, seed=0, image_size=64, questions_per_image=1, split="test")
    model, processor = tiny_model(fusion="concat_mlp", schedule="uniform:2")
    features, objects = object_tokens(model, processor, tmp_path, "test", 3)
    config = model.config
    d, g = config.vision_config.hidden_size, config.high_res_grid**2
    assert features["projector input"].shape == (len(objects), d * (1 + g))
    # Its first d entries: the normalised low-res token of the feature layer under the first object's centre.
    scenes = json.loads((tmp_path / "test_scenes.json").read_text())
    key = next(iter(scenes))
    pixel_values = processor.preprocess_images([str(tmp_path / key)])
    feature = config.feature_layer % (config.vision_depth + 1)
    with torch.no_grad():
        tokens = encode_layers(model.vision_tower, pixel_values.flatten(0, 1), [feature], config.patches_per_side**2)
        low = model.fusion.input_norm(tokens[0, 0])  # layer 0 of [feature], view 0 (low-res): (P, d)
    obj = scenes[key]["objects"][0]
    index = centre_patch(obj["x"], obj["y"], config.patches_per_side)
    torch.testing.assert_close(features["projector input"][0, :d], low[index], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(features["projector input"][0, :d], features["projector input"][0, d : 2 * d])


def test_characters_are_scored_apart_for_glyphs_the_crops_cut_and_glyphs_one_crop_shows(tmp_path, monkeypatch):
    from sparsecut.data.shapesworld import SceneObject, glyph_cut_by_grid

    model, results = probed(tmp_path, monkeypatch, 200, 60)

    def objects(split):
        scenes = json.loads((tmp_path / f"{split}_scenes.json").read_text())
        return [SceneObject(**o) for scene in scenes.values() for o in scene["objects"]]

    seen = {o.char for o in objects("train") if o.char}
    glyphs = [o for o in objects("test") if o.char in seen]  # only characters seen in training are scored
    cut = sum(glyph_cut_by_grid(o, 64, model.config.high_res_grid) for o in glyphs)
    assert 0 < cut < len(glyphs)  # the fixture has both kinds
    assert results["objects"]["char cut"] == cut and results["objects"]["char whole"] == len(glyphs) - cut
    for scores in results["probes"].values():  # the two parts make up the whole
        parts = cut * scores["char cut"] + (len(glyphs) - cut) * scores["char whole"]
        assert abs(parts - len(glyphs) * scores["char"]) < 1e-6
    assert "char whole | char cut |" in (tmp_path / "out" / "probe.md").read_text()


def llm_probe_data(tmp_path):
    """A fresh 64 px ShapesWorld (8 questions an image, so every attribute family is asked) and a tiny model."""
    from sparsecut.data.shapesworld import generate_dataset
    from sparsecut.testing import tiny_model

    for split, n in (("train", 10), ("test", 6)):
        generate_dataset(tmp_path, n_images=n, seed=0, image_size=64, questions_per_image=8, split=split)
    return tiny_model(fusion="concat_mlp", schedule="uniform:2")


def test_llm_states_are_read_at_the_asked_about_object_and_where_the_answer_is_predicted(tmp_path):
    from sparsecut.data.llava_format import load_llava_json, sample_to_messages
    from sparsecut.evaluation.probe import question_states

    model, processor = llm_probe_data(tmp_path)
    depth = model.config.text_config.num_hidden_layers
    states = question_states(model, processor, tmp_path, "test", "colour", 3, layers=[0, depth])
    samples = [
        s
        for s in load_llava_json(str(tmp_path / "test.json"), image_root=str(tmp_path))
        if s.meta["family"] == "colour"
    ][:3]
    assert states["answers"] == [s.turns[1][1] for s in samples]
    scenes = json.loads((tmp_path / "test_scenes.json").read_text())
    for k, sample in enumerate(samples):
        # Layer 0 at the object: the LLM input token that the fusion makes for the patch under an object of
        # the answer's colour.
        scene = scenes[str(Path(sample.image).relative_to(tmp_path).as_posix())]
        obj = next(o for o in scene["objects"] if o["colour"] == sample.turns[1][1])
        with torch.no_grad():
            tokens = model.get_image_features(processor.preprocess_images([sample.image])).inputs[0]  # (P, D)
        index = centre_patch(obj["x"], obj["y"], model.config.patches_per_side)
        torch.testing.assert_close(states["object"][k, 0], tokens[index], rtol=1e-4, atol=1e-5)
        # The last layer at the answer position predicts the token the model answers with.
        inputs = processor.apply_chat_template(
            [sample_to_messages(sample)[:1]],
            images=[[sample.image]],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )
        with torch.no_grad():
            first = model.generate(**inputs, max_new_tokens=1, do_sample=False)[0, -1]
            logits = model.compute_logits(states["answer"][k, 1])
        assert int(logits.argmax()) == int(first)


def test_llm_probe_scores_every_layer_family_and_position(tmp_path, monkeypatch):
    from sparsecut.evaluation import probe as probe_module
    from sparsecut.evaluation.probe import llm_probe

    model, processor = llm_probe_data(tmp_path)
    monkeypatch.setattr(probe_module, "load_model", lambda *args, **kwargs: (model, processor))
    depth = model.config.text_config.num_hidden_layers
    results = llm_probe(data=str(tmp_path), families=["colour", "pattern"], out_dir=str(tmp_path / "out"))
    assert results["layers"] == sorted({*range(0, depth + 1, 4), depth})
    assert list(results["probes"]) == [str(layer) for layer in results["layers"]]
    columns = ["colour object", "colour answer", "pattern object", "pattern answer"]
    for scores in results["probes"].values():
        assert sorted(scores) == sorted(columns) and all(0.0 <= v <= 1.0 for v in scores.values())
    test = json.loads((tmp_path / "test.json").read_text())
    assert results["questions"]["colour"]["test"] <= sum(r["family"] == "colour" for r in test)
    assert json.loads((tmp_path / "out" / "llm_probe.json").read_text()) == results
    assert "| colour object |" in (tmp_path / "out" / "llm_probe.md").read_text()
    with pytest.raises(ValueError, match="description"):
        llm_probe(data=str(tmp_path), families=["description"], out_dir=str(tmp_path / "out"))
    (tmp_path / "test.json").write_text(json.dumps([r for r in test if r["family"] != "shape"]))
    with pytest.raises(ValueError, match="no shape questions"):
        llm_probe(data=str(tmp_path), families=["shape"], out_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="layers must lie"):
        llm_probe(data=str(tmp_path), families=["colour"], layers=[depth + 1], out_dir=str(tmp_path / "out"))
