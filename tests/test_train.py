"""A tiny two-stage training run on ShapesWorld: the loss goes down and the checkpoints reload."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sparsecut import load_model
from sparsecut.data.shapesworld import generate_dataset
from sparsecut.testing import TINY_TEXT, TINY_VISION, tiny_model
from sparsecut.training.train import StageConfig, TrainConfig, initial_model, read_log, set_trainable, train

TINY_MODEL = {  # the toy backbones of sparsecut.testing, as a training yaml names them
    "vision": {"model_type": "siglip_vision_model", **TINY_VISION},
    "llm": {"model_type": "llama", **TINY_TEXT},
    "tokenizer": "byte",
    "config": {"fusion": "cross_attention", "schedule": "uniform:2", "fusion_num_heads": 4},
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    train_json = generate_dataset(root, n_images=8, seed=0, image_size=64, questions_per_image=2, split="train")
    test_json = generate_dataset(root, n_images=4, seed=0, image_size=64, questions_per_image=2, split="test")
    return train_json, test_json


def write_config(tmp_path, shapes, stages):
    config = {"output_dir": str(tmp_path / "run"), "seed": 0, "model": TINY_MODEL, "stages": stages}
    path = tmp_path / "tiny.yaml"
    path.write_text("# sparsecut train tiny.yaml\n" + yaml.safe_dump(config))
    return path


def test_two_stages_lower_the_loss_and_reload(tmp_path, shapes):
    train_json, test_json = shapes
    common = {"data": str(train_json), "eval_data": str(test_json), "batch_size": 4, "eval_every": 10}
    path = write_config(
        tmp_path,
        shapes,
        [
            {**common, "name": "align", "train": ["fusion", "gates"], "max_steps": 10, "learning_rate": 3e-3},
            {
                **common,
                "name": "instruct",
                "train": ["fusion", "gates", "llm"],
                "max_steps": 20,
                "learning_rate": 3e-3,
                "group_turns": 2,
                "independent_turns": True,
                "num_workers": 1,
            },  # images read in a worker process
        ],
    )
    final = train(str(path))
    assert final == tmp_path / "run" / "instruct"
    log = [json.loads(line) for line in (final / "log.jsonl").read_text().splitlines()]
    assert len(log) == 20 and log[-1]["eval_loss"] < log[9]["eval_loss"]
    # The grounding check: the same held-out answers with each image swapped for another sample's.
    assert log[-1]["eval_loss_other_image"] > 0 and log[-1]["eval_loss_other_image"] != log[-1]["eval_loss"]
    first_align = json.loads((tmp_path / "run" / "align" / "log.jsonl").read_text().splitlines()[0])
    assert log[-1]["loss"] < first_align["loss"]
    assert (final / "loss.png").is_file() and not (final / "state").exists()
    model, processor = load_model(final, device="cpu")
    assert model.config.shortcut_llm_layers == [1, 3]
    # a finished run is not redone: the second call only reloads
    assert train(str(path)) == final
    assert len((final / "log.jsonl").read_text().splitlines()) == 20


def test_set_trainable_is_explicit():
    from sparsecut.testing import tiny_model

    model, _ = tiny_model()
    n = set_trainable(model, ["fusion", "gates"])
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fusion", "shortcuts"}
    assert n == sum(p.numel() for p in model.fusion.parameters()) + model.shortcuts.gate.numel()
    with pytest.raises(ValueError, match="unknown trainable parts"):
        StageConfig(name="x", data="d.json", train=["everything"])


def test_config_paths_are_relative_to_the_yaml(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "c.yaml"
    path.write_text(yaml.safe_dump({"output_dir": "o", "stages": [{"name": "a", "data": "d/train.json"}]}))
    config = TrainConfig.from_yaml(path)
    assert config.stages[0].data == str((tmp_path / "sub" / "d" / "train.json").resolve())
    assert config.output_dir == str((tmp_path / "sub" / "o").resolve())


def test_lora_stage_ships_without_the_base_llm(tmp_path, shapes, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparsecut.tokenization import byte_tokenizer

    train_json, _ = shapes
    llm_dir = tmp_path / "base-llm"
    llm_spec = {k: v for k, v in TINY_MODEL["llm"].items() if k != "model_type"}
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **llm_spec)).save_pretrained(llm_dir)
    byte_tokenizer().save_pretrained(llm_dir)
    path = tmp_path / "lora.yaml"
    config = {
        "output_dir": str(tmp_path / "run"),
        "save_base_llm": False,
        "lora": {"r": 4},
        "model": {**TINY_MODEL, "llm": str(llm_dir), "tokenizer": None},
        "stages": [
            {
                "name": "instruct",
                "data": str(train_json),
                "train": ["fusion", "gates", "lora"],
                "max_steps": 3,
                "batch_size": 4,
                "learning_rate": 1e-2,
            }
        ],
    }
    path.write_text(yaml.safe_dump(config))
    final = train(str(path))
    from safetensors import safe_open

    with safe_open(str(final / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert any("lora_A" in key for key in keys)
    assert not any(key.startswith("language_model.") and "lora_" not in key for key in keys)
    model, processor = load_model(final, device="cpu", merge_adapters=False)
    assert model.config.lora["r"] == 4 and model.config.base_llm == str(llm_dir)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained (LoRA B starts at zero)
    # quantized loading goes through a materialized full checkpoint with the adapters merged
    monkeypatch.setenv("SPARSECUT_CACHE", str(tmp_path / "cache"))
    inputs = processor(text="<image>\nWhat?", images=[str(final.parent.parent / "run" / "instruct" / "loss.png")])
    with torch.no_grad():
        reference = model(**inputs).logits
        quantized, _ = load_model(final, device="cpu", quantization="8bit")
        assert quantized.config.lora is None
        assert (quantized(**inputs).logits - reference).abs().mean() < 0.25 * reference.std()


def crash_on_step(monkeypatch, n: int):
    """Make the n-th optimizer step raise; returns a function that undoes it."""
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("simulated crash")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return lambda: monkeypatch.setattr(torch.optim.AdamW, "step", real_step)


def align_stage(train_json, **extra) -> dict:
    return {
        "name": "align",
        "data": str(train_json),
        "train": ["fusion", "gates"],
        "max_steps": 5,
        "save_every": 2,
        "batch_size": 4,
        **extra,
    }


def test_an_interrupted_stage_resumes_from_its_last_checkpoint(tmp_path, shapes, monkeypatch):
    train_json, _ = shapes
    path = write_config(tmp_path, shapes, [align_stage(train_json)])
    undo = crash_on_step(monkeypatch, 4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(str(path))
    stage_dir = tmp_path / "run" / "align"
    assert json.loads((stage_dir / "state" / "step.json").read_text())["step"] == 2
    undo()
    train(str(path))
    steps = [json.loads(line)["step"] for line in (stage_dir / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # steps 1-2 from the first run, 3-5 after resuming, none twice
    assert not (stage_dir / "state").exists() and (stage_dir / "config.json").is_file()


def test_a_resumed_stage_averages_with_where_the_stage_started_not_where_it_resumed(tmp_path, shapes, monkeypatch):
    train_json, _ = shapes
    stage = align_stage(train_json, average_with_start=1.0)  # 1.0: all the way back to the start
    (tmp_path / "whole").mkdir(), (tmp_path / "resumed").mkdir()
    whole = train(str(write_config(tmp_path / "whole", shapes, [stage])))
    path = write_config(tmp_path / "resumed", shapes, [stage])
    undo = crash_on_step(monkeypatch, 4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(str(path))
    undo()
    resumed = train(str(path))
    expected, got = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_encoding_labels_answers_only_and_truncates_without_cutting_images():
    from sparsecut.data.collate import IGNORE_INDEX, encode_sample
    from sparsecut.data.llava_format import Sample
    from sparsecut.testing import tiny_model

    _, processor = tiny_model()
    sample = Sample(
        id="s",
        image="x.png",
        turns=[("user", "<image>\nColour?"), ("assistant", "red"), ("user", "Shape?"), ("assistant", "a star")],
    )
    encoded = encode_sample(sample, processor)
    supervised = [t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(supervised) == "red<|im_end|>\na star<|im_end|>\n"
    assert encoded.input_ids.count(processor.image_token_id) == processor.num_image_tokens
    cut = encode_sample(sample, processor, max_length=len(encoded.input_ids) - 3)
    assert cut.input_ids == encoded.input_ids[:-3] and cut.labels == encoded.labels[:-3]
    with pytest.raises(ValueError, match="would cut its image"):
        encode_sample(sample, processor, max_length=5)


def test_length_grouped_batches_cover_the_data_once_with_little_padding():
    from sparsecut.training.train import LengthGroupedBatches

    lengths = [int(x) for x in torch.randint(20, 300, (1000,), generator=torch.Generator().manual_seed(0))]
    sampler = LengthGroupedBatches(lengths, batch_size=8, seed=0, window=16)
    first, second = list(sampler), list(sampler)
    assert sorted(i for batch in first for i in batch) == list(range(1000))
    assert len(first) == len(sampler) == 125 and all(len(batch) <= 8 for batch in first)
    assert first != second  # each pass is a new order ...
    sampler.passes = 0
    assert list(sampler) == first  # ... that depends only on the seed and the pass (resumes repeat it)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    shuffled = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).tolist()
    assert padding(first) < 0.25 * padding([shuffled[k : k + 8] for k in range(0, 1000, 8)])


def test_the_grounding_check_gives_every_sample_another_image():
    from sparsecut.training.train import other_images

    a, b, c = (torch.full((5, 3, 4, 4), float(v)) for v in (1, 2, 3))
    batch = torch.stack([a, a, a, b, b, c])  # questions about one image come in a row in held-out files
    swapped = other_images(batch)
    assert swapped.shape == batch.shape
    assert all(not torch.equal(swapped[i], batch[i]) for i in range(len(batch)))
    assert {float(x[0, 0, 0, 0]) for x in swapped} <= {1.0, 2.0, 3.0}  # images of the batch, only moved
    assert other_images(torch.stack([a, a])) is None and other_images(None) is None


def test_fusion_trains_at_its_own_learning_rate():
    from sparsecut.adapters import LORA_DEFAULTS
    from sparsecut.testing import tiny_model
    from sparsecut.training.train import add_lora, parameter_groups

    model, _ = tiny_model()
    add_lora(model, dict(LORA_DEFAULTS, r=2))
    set_trainable(model, ["fusion", "gates", "lora"])
    stage = StageConfig(name="x", data="d.json", learning_rate=1e-4, fusion_learning_rate=3e-3)
    fusion_group, llm_group = parameter_groups(model, stage)
    new = {id(p) for p in [*model.fusion.parameters(), *model.shortcuts.parameters()]}
    assert fusion_group["lr"] == 3e-3 and {id(p) for p in fusion_group["params"]} == new
    assert llm_group["lr"] == 1e-4 and llm_group["params"]
    assert all("lora_" in name for name, p in model.named_parameters() if id(p) in map(id, llm_group["params"]))
    # Without its own rate, the fusion trains at the stage's.
    plain = StageConfig(name="x", data="d.json", learning_rate=1e-4)
    assert [group["lr"] for group in parameter_groups(model, plain)] == [1e-4, 1e-4]


def test_a_stage_can_train_on_chosen_families_only(tmp_path, shapes):
    from sparsecut.testing import tiny_model
    from sparsecut.training.train import _loader

    train_json, test_json = shapes
    families = {record["family"] for record in json.loads(open(train_json).read())}
    assert len(families) > 1
    _, processor = tiny_model()
    keep = sorted(families & {record["family"] for record in json.loads(open(test_json).read())})[:1]
    stage = StageConfig(name="x", data=str(train_json), families=keep, batch_size=2)
    loader = _loader(str(train_json), None, processor, stage, shuffle=True, seed=0)
    assert {sample.meta["family"] for sample in loader.dataset.samples} == set(keep)
    # The held-out loss is taken on the same families.
    held_out = _loader(str(test_json), None, processor, stage, shuffle=False, seed=0)
    held_out_families = {sample.meta["family"] for sample in held_out.dataset.samples}
    assert held_out_families == set(keep) and len(held_out.dataset) < len(json.loads(open(test_json).read()))
    with pytest.raises(ValueError, match="no record"):
        _loader(str(train_json), None, processor, StageConfig(name="x", data="d", families=["nope"]), True, 0)


def test_training_images_can_carry_more_questions_than_test_images(tmp_path):
    from collections import Counter

    from sparsecut.training.train import prepare_shapesworld

    prepare_shapesworld(str(tmp_path), train_images=3, test_images=2, image_size=32, train_questions_per_image=6)
    per_image = {
        split: Counter(record["image"] for record in json.loads((tmp_path / f"{split}.json").read_text()))
        for split in ("train", "test")
    }
    assert set(per_image["train"].values()) == {6} and len(per_image["train"]) == 3
    assert set(per_image["test"].values()) == {4} and len(per_image["test"]) == 2
    # An existing split made with another count is not silently reused.
    with pytest.raises(ValueError, match="questions per image"):
        prepare_shapesworld(str(tmp_path), train_images=3, test_images=2, image_size=32)


def test_branch_attention_shares_the_prefix_only():
    from sparsecut.data.collate import branch_attention

    segments = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 0], [0, 0, 0, 0, 0, 0, 0, 0]])
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0], [1] * 8]).bool()
    mask, positions = branch_attention(segments, valid)
    assert mask.shape == (2, 1, 8, 8)
    assert positions[0].tolist() == [0, 1, 2, 3, 2, 3, 4, 0]  # branch 2 continues from the prefix, like branch 1
    assert mask[0, 0, 5].tolist() == [True, True, False, False, True, True, False, False]
    assert mask[0, 0, 7].tolist() == [False] * 7 + [True]  # padding sees itself only (no NaN rows)
    # Unpacked rows are plain causal sequences.
    assert torch.equal(mask[1, 0], torch.ones(8, 8, dtype=torch.bool).tril())
    assert positions[1].tolist() == list(range(8))


def _questions_about_one_image(tmp_path):
    from PIL import Image

    from sparsecut.data.llava_format import Sample

    image = tmp_path / "scene.png"
    Image.new("RGB", (48, 40), (200, 30, 30)).save(image)
    qa = [
        ("What colour is the circle?", "red"),
        ("Describe the image.", "a large red circle at the top left"),
        ("How many squares are there?", "0"),
    ]
    return [
        Sample(id=f"q{i}", image=str(image), turns=[("user", "<image>\n" + q), ("assistant", a)])
        for i, (q, a) in enumerate(qa)
    ]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_questions_are_computed_as_if_each_was_asked_alone(tmp_path, attention):
    from sparsecut.data.collate import IGNORE_INDEX, Collator, ConversationDataset, encode_sample
    from sparsecut.data.llava_format import group_by_image, image_groups
    from sparsecut.testing import tiny_model

    model, processor = tiny_model()
    model.language_model.set_attn_implementation(attention)
    samples = _questions_about_one_image(tmp_path)
    collate = Collator(processor)
    packed = ConversationDataset.packed(image_groups(samples, 8), processor).items
    assert len(packed) == 1 and packed[0].input_ids.count(processor.image_token_id) == processor.num_image_tokens

    def answer_logits(items):
        batch = collate(items)
        with torch.no_grad():
            logits = model(**batch).logits
        # Logits that predict each supervised token, in order.
        return logits[:, :-1][batch["labels"][:, 1:] != IGNORE_INDEX]

    alone = answer_logits([encode_sample(sample, processor) for sample in samples])
    together = answer_logits(packed)
    assert together.shape == alone.shape
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
    # Merged into one conversation instead, later answers see earlier ones: their logits change.
    merged = answer_logits([encode_sample(group_by_image(samples, 8)[0], processor)])
    assert not torch.allclose(merged[-3:], alone[-3:], atol=1e-3)


def test_packing_refuses_what_it_cannot_share(tmp_path):
    from sparsecut.data.collate import encode_sample, pack_shared_prefix
    from sparsecut.data.llava_format import Sample
    from sparsecut.testing import tiny_model

    _, processor = tiny_model()
    one, two, _ = (encode_sample(s, processor) for s in _questions_about_one_image(tmp_path))
    with pytest.raises(ValueError, match="one and the same image"):
        pack_shared_prefix(
            [
                one,
                encode_sample(
                    Sample(id="o", image="other.png", turns=[("user", "<image>\nColour?"), ("assistant", "red")]),
                    processor,
                ),
            ],
            processor.image_token_id,
        )
    late = encode_sample(
        Sample(
            id="l",
            image=one.image,
            turns=[("user", "Hi"), ("assistant", "hello"), ("user", "<image>\nColour?"), ("assistant", "red")],
        ),
        processor,
    )
    with pytest.raises(ValueError, match="outside the shared prefix"):
        pack_shared_prefix([one, late], processor.image_token_id)


def test_independent_turns_pack_each_images_questions(tmp_path, shapes):
    from sparsecut.data.collate import IGNORE_INDEX
    from sparsecut.testing import tiny_model
    from sparsecut.training.train import _loader

    train_json, _ = shapes
    records = json.loads(open(train_json).read())
    _, processor = tiny_model()
    stage = StageConfig(name="x", data=str(train_json), batch_size=4, group_turns=8, independent_turns=True)
    loader = _loader(str(train_json), None, processor, stage, shuffle=True, seed=0)
    items = loader.dataset.items
    assert len(items) == len({r["image"] for r in records})  # one packed sequence per image
    for item in items:
        assert item.input_ids.count(processor.image_token_id) == processor.num_image_tokens
        answers = {r["conversations"][1]["value"] for r in records if item.image.endswith(r["image"])}
        supervised = processor.tokenizer.decode(
            [t for t, label in zip(item.input_ids, item.labels) if label != IGNORE_INDEX]
        )
        assert set(supervised.split("<|im_end|>\n")) - {""} == answers
    batch = next(iter(loader))
    assert batch["attention_mask"].ndim == 4 and batch["position_ids"].shape == batch["input_ids"].shape


def test_family_weights_repeat_a_familys_records_next_to_their_image(tmp_path, shapes):
    from collections import Counter

    from sparsecut.testing import tiny_model
    from sparsecut.training.train import _loader

    train_json, _ = shapes
    recorded = Counter(record["family"] for record in json.loads(open(train_json).read()))
    up, dropped, half = sorted(recorded)[:3]
    _, processor = tiny_model()

    def loaded(weights, seed=0):
        stage = StageConfig(name="x", data=str(train_json), family_weights=weights, batch_size=2)
        return _loader(str(train_json), None, processor, stage, shuffle=True, seed=seed).dataset.samples

    samples = loaded({up: 3, dropped: 0, half: 0.5})
    counts = Counter(sample.meta["family"] for sample in samples)
    assert counts[up] == 3 * recorded[up] and dropped not in counts
    assert 0 <= counts[half] <= recorded[half]
    assert all(counts[f] == recorded[f] for f in recorded if f not in (up, dropped, half))
    repeated = [i for i in range(1, len(samples)) if samples[i] == samples[i - 1]]
    assert len(repeated) == 2 * recorded[up]  # each copy right after its record: an image's records stay together
    again = loaded({up: 3, dropped: 0, half: 0.5})
    assert [s.meta["family"] for s in again] == [s.meta["family"] for s in samples]  # the coin tosses are seeded
    with pytest.raises(ValueError, match=">= 0"):
        StageConfig(name="x", data="d.json", family_weights={up: -1})
    with pytest.raises(ValueError, match="leave no record"):
        loaded({family: 0 for family in recorded})


def test_the_seed_fixes_the_new_modules_initialisation():
    def fresh(seed):
        torch.rand(7)  # whatever ran before must not matter
        config = TrainConfig.from_dict(
            {
                "output_dir": "unused",
                "seed": seed,
                "model": TINY_MODEL,
                "stages": [{"name": "align", "data": "train.json"}],
            },
            Path("."),
        )
        model, _ = initial_model(config)
        return {name: value.clone() for name, value in model.state_dict().items() if name.startswith("fusion.")}

    first, again, other = fresh(0), fresh(0), fresh(1)
    assert first and all(torch.equal(first[name], again[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first)


def test_a_stage_can_draw_its_data_order_from_its_own_seed(tmp_path, shapes, monkeypatch):
    from sparsecut.training.train import LengthGroupedBatches

    train_json, _ = shapes
    seen = []
    batches_of = LengthGroupedBatches.__iter__

    def recorded(self):
        batches = list(batches_of(self))
        seen.append(batches)
        yield from batches

    monkeypatch.setattr(LengthGroupedBatches, "__iter__", recorded)

    def order(name, **stage_seed):
        stage = {"name": "align", "data": str(train_json), "batch_size": 2, "max_steps": 2, **stage_seed}
        (tmp_path / name).mkdir()
        train(str(write_config(tmp_path / name, shapes, [stage])))
        return seen.pop()

    run_seed = order("run-seed")  # the run's seed, 0
    assert order("same", seed=0) == run_seed
    own = order("own", seed=5)
    assert own != run_seed and sorted(sum(own, [])) == sorted(sum(run_seed, []))  # the same data, another order


def test_model_paths_are_taken_from_the_yamls_folder_when_explicitly_relative_or_found_there(tmp_path):
    (tmp_path / "checkpoints" / "mine").mkdir(parents=True)
    configs = tmp_path / "configs"
    configs.mkdir()

    def model_paths(model: dict, **extra) -> dict:
        raw = {"output_dir": "out", "model": model, "stages": [{"name": "align", "data": "train.json"}], **extra}
        return TrainConfig.from_dict(raw, configs).model

    mine = str((tmp_path / "checkpoints" / "mine").resolve())
    assert model_paths({"init": "../checkpoints/mine"})["init"] == mine
    assert model_paths({"vision": "../checkpoints/mine"})["vision"] == mine
    assert model_paths({"init": "org/model"})["init"] == "org/model"  # no such folder: a hub id, left alone
    missing = model_paths({"init": "../runs/not-trained-yet"})["init"]  # explicitly relative: from the yaml
    assert missing == str((tmp_path / "runs" / "not-trained-yet").resolve())
    written = model_paths({"vision": "../runs/vision"}, vision_pretraining={"steps": 1})["vision"]
    assert written == str((tmp_path / "runs" / "vision").resolve())  # stage 0 writes it there


def test_bf16_falls_back_to_float32_on_a_cpu_without_bf16_instructions(monkeypatch):
    from sparsecut.training import train as training

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no bf16 instructions"):
        assert training.mixed_precision_for("bf16") == "no"
    assert training.mixed_precision_for("auto") == "no"
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: True)
    assert training.mixed_precision_for("bf16") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training.mixed_precision_for("auto") == "bf16"
    assert training.mixed_precision_for("no") == "no"
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        TrainConfig.from_dict(
            {
                "output_dir": "unused",
                "mixed_precision": "bfloat16",
                "stages": [{"name": "align", "data": "train.json"}],
            },
            Path("."),
        )


def test_a_saved_model_can_be_trained_on_with_overlapping_crops(tmp_path):
    model, processor = tiny_model(fusion="concat_mlp")
    model.save_pretrained(tmp_path / "init")
    processor.save_pretrained(tmp_path / "init")
    stages = [{"name": "align", "data": "train.json"}]
    config = TrainConfig.from_dict(
        {"output_dir": "unused", "model": {"init": "init", "high_res_overlap": True}, "stages": stages}, tmp_path
    )
    loaded, loaded_processor = initial_model(config)
    assert loaded.config.high_res_overlap and loaded_processor.num_views == loaded.config.num_views == 10
    with pytest.raises(ValueError, match="model.config"):
        TrainConfig.from_dict(
            {"output_dir": "unused", "model": {**TINY_MODEL, "high_res_overlap": True}, "stages": stages}, tmp_path
        )


def test_a_stage_can_end_on_the_mean_of_its_start_and_its_end(tmp_path, shapes):
    train_json, test_json = shapes
    common = {"data": str(train_json), "eval_data": str(test_json), "batch_size": 4, "learning_rate": 3e-3}
    first = {**common, "name": "first", "train": ["fusion", "gates"], "max_steps": 3}

    def run(name, **second):
        stages = [first, {**common, "name": "second", "train": ["fusion", "gates", "llm"], "max_steps": 4, **second}]
        (tmp_path / name).mkdir()
        final = train(str(write_config(tmp_path / name, shapes, stages)))
        weights = {stage: load_file(final.parent / stage / "model.safetensors") for stage in ("first", "second")}
        return weights, read_log(final / "log.jsonl")

    (plain, plain_log), (mean, mean_log) = run("plain"), run("mean", average_with_start=0.5)
    assert plain["second"].keys() == mean["second"].keys() == plain["first"].keys()
    moved = 0
    for key, end in plain["second"].items():
        start = plain["first"][key]
        assert torch.equal(start, mean["first"][key])  # the same first stage both times
        torch.testing.assert_close(mean["second"][key], (start + end) / 2, rtol=1e-5, atol=1e-6)
        moved += not torch.equal(start, end)
    assert moved > 10  # the stage trained the fusion and the LLM, and the saved model is half way back
    assert mean_log[-1]["average_with_start"] == 0.5 and "average_with_start" not in plain_log[-1]
    assert mean_log[-1]["eval_loss"] == pytest.approx(plain_log[-1]["eval_loss"])
    assert mean_log[-1]["averaged_eval_loss"] != mean_log[-1]["eval_loss"]
    with pytest.raises(ValueError, match="average_with_start"):
        StageConfig(name="x", data="d", average_with_start=1.5)
