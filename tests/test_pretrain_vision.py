"""Stage 0 of the offline default: encoder pretraining targets and a short run."""

import random

from transformers import AutoModel

from sparsecut.data.shapesworld import sample_scene
from sparsecut.training.pretrain_vision import VisionPretrainConfig, occupancy, pretrain_vision, view_targets


def test_targets_follow_object_centres_into_each_view():
    scene = sample_scene(random.Random(3))
    obj = scene.objects[0]
    targets = view_targets(scene, side=8, grid=2)
    assert (int(obj.y * 8) * 8 + int(obj.x * 8), obj) in targets[0]
    crop = 1 + min(int(obj.y * 2), 1) * 2 + min(int(obj.x * 2), 1)
    row, col = int((obj.y * 2 % 1) * 8), int((obj.x * 2 % 1) * 8)
    assert (row * 8 + col, obj) in targets[crop]
    assert sum(len(view) for view in targets[1:]) == len(scene.objects)  # each centre lies in exactly one crop
    maps = occupancy(scene, 8, 2)
    assert maps.shape == (5, 64) and maps[0, int(obj.y * 8) * 8 + int(obj.x * 8)] == 1


def test_short_pretraining_learns_and_saves_a_loadable_encoder(tmp_path):
    out = pretrain_vision(
        VisionPretrainConfig(
            steps=12, batch_size=4, learning_rate=3e-3, encoder=dict(hidden_size=32, intermediate_size=64)
        ),
        tmp_path,
    )
    encoder = AutoModel.from_pretrained(out)
    assert encoder.config.image_size == 64 and encoder.config.hidden_size == 32
    import json

    log = json.loads((out / "pretrain_log.json").read_text())["log"]
    assert log[-1]["loss"] < log[0]["loss"]


def test_stage_zero_scenes_always_carry_a_character():
    import random

    from sparsecut.training.pretrain_vision import sample_scene_with_character

    rng = random.Random(0)
    scenes = [sample_scene_with_character(rng) for _ in range(20)]
    assert all(any(obj.char for obj in scene.objects) for scene in scenes)
    assert len({scene.objects for scene in scenes}) == 20  # still a stream of different scenes


def test_scene_batches_are_seeded_per_worker():
    import itertools

    import torch

    from sparsecut.training.pretrain_vision import SceneBatches

    def first(stream, n=2):
        return [batch for batch in itertools.islice(stream, n)]

    in_process = first(iter(SceneBatches(seed=1, batch_size=2, size=64, grid=2, side=8)))
    again = first(iter(SceneBatches(seed=1, batch_size=2, size=64, grid=2, side=8)))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in zip(in_process, again))
    pixels, occupied, picks, labels = in_process[0]
    assert pixels.shape == (2 * 5, 3, 64, 64) and occupied.shape == (10, 64)
    assert picks.shape[1] == 3 and all(len(labels[name]) == len(picks) for name in labels)
    # Two workers: each renders its own stream (no batch twice), and the run is repeatable.
    loader = torch.utils.data.DataLoader(SceneBatches(1, 2, 64, 2, 8), batch_size=None, num_workers=2)
    from_workers = first(loader, 4)
    assert not torch.equal(from_workers[0][0], from_workers[1][0])
    repeated = first(torch.utils.data.DataLoader(SceneBatches(1, 2, 64, 2, 8), batch_size=None, num_workers=2), 4)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(from_workers, repeated))
