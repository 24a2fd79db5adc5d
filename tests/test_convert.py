"""`sparsecut convert`: a LLaVA checkpoint becomes a SparseCut model that starts exactly equal to it, and trains."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import image_question, random_image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, LogitsProcessor, LogitsProcessorList

from sparsecut import build, load_model
from sparsecut.cli import main
from sparsecut.convert import LLAVA_1_5, convert, sparsecut_key
from sparsecut.testing import tiny_llava, tiny_text_config, tiny_vision_config
from sparsecut.tokenization import byte_tokenizer
from sparsecut.training.experiment import variant_config
from sparsecut.training.train import set_trainable

ROOT = Path(__file__).resolve().parents[1]
# (decoder, tower, LLaVA's own padding to a square): llava-hf's LLaVA-1.5 crops, the original code pads; SigLIP
# towers resize (llava-interleave-qwen).
SOURCES = [("llama", "clip", True), ("qwen2", "clip", False), ("llama", "siglip", False), ("qwen2", "siglip", False)]
FUSIONS = ["none", "concat_mlp", "cross_attention"]


@pytest.fixture(scope="module", params=SOURCES, ids=lambda source: f"{source[0]}-{source[1]}")
def source(request, tmp_path_factory):
    """A tiny random LLaVA saved as a llava-hf checkpoint: (folder, model)."""
    decoder, tower, pad = request.param
    folder = tmp_path_factory.mktemp(f"llava-{decoder}-{tower}")
    return folder, tiny_llava(folder, decoder, tower, pad=pad)


def llava_inputs(folder: Path, model_processor, question: str = "What is this?"):
    """The same wide image and prompt through each model's own processor: (LLaVA's inputs, SparseCut's inputs)."""
    conversation = image_question(random_image(1, width=60, height=40), question)
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    return (
        AutoProcessor.from_pretrained(folder).apply_chat_template(conversation, **kwargs),
        model_processor.apply_chat_template(conversation, **kwargs),
    )


@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_converted_llava_gives_its_logits_and_greedy_tokens(source, fusion, tmp_path):
    folder, llava = source
    schedule = "none" if fusion == "none" else "uniform:2"
    out = convert(str(folder), tmp_path / "out", fusion=fusion, schedule=schedule)
    model, processor = load_model(out, device="cpu")
    theirs, ours = llava_inputs(folder, processor)

    assert torch.equal(theirs["input_ids"], ours["input_ids"])
    assert torch.equal(theirs["pixel_values"], ours["pixel_values"][:, 0])  # the low-res view is LLaVA's image
    assert model.config.num_shortcuts == (0 if fusion == "none" else 2)
    with torch.no_grad():
        expected, got = llava(**theirs).logits, model(**ours).logits
    if fusion == "concat_mlp":  # a wider matmul (zeros for the crops) may sum in another order
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    else:  # the same arithmetic: the residual block adds exact zeros, the gates multiply by 0
        assert torch.equal(got, expected)
    greedy = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(**ours, **greedy), llava.generate(**theirs, **greedy))


@pytest.mark.parametrize("fusion", ["concat_mlp", "cross_attention"])
def test_the_fusion_of_a_converted_llava_trains_away_from_it(fusion, tmp_path):
    folder = tmp_path / "llava"
    llava = tiny_llava(folder, "llama", "clip")
    out = convert(str(folder), tmp_path / "out", fusion=fusion, schedule="uniform:2")
    model, processor = load_model(out, device="cpu")
    theirs, ours = llava_inputs(folder, processor)
    answer = processor.tokenizer(" a red square", return_tensors="pt")["input_ids"]
    inputs = {**ours, "input_ids": torch.cat([ours["input_ids"], answer], dim=1)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -answer.shape[1] :] = answer
    start = {name: value.clone() for name, value in model.fusion.state_dict().items()}
    set_trainable(model, ["fusion", "gates"])
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())

    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(**ours).logits, llava(**theirs).logits, atol=1e-3)
    if fusion == "cross_attention":  # the zero output layers grew, and the attention behind them trains too
        block = model.fusion.cross_attention
        assert block.o_proj.weight.abs().max() > 0 and block.ffn[2].weight.abs().max() > 0
        assert not torch.equal(block.q_proj.weight, start["cross_attention.q_proj.weight"])
    else:  # the crops' columns of the first projector layer, zero at the start, are read now
        d = model.config.vision_config.hidden_size
        assert model.fusion.projector.linear_1.weight[:, d:].abs().max() > 0
    assert model.shortcuts.gate.abs().max() > 0


def test_a_checkpoint_with_a_missing_tensor_is_refused_naming_it(tmp_path):
    folder = tmp_path / "llava"
    tiny_llava(folder, "llama", "clip")
    out = convert(str(folder), tmp_path / "out")
    drop_weight(out / "model.safetensors", "vision_tower", "layers.1.mlp.fc1.weight")
    with pytest.raises(ValueError, match=r"missing keys: .*layers\.1\.mlp\.fc1\.weight"):
        load_model(out, device="cpu")

    # a LLaVA that lacks one is refused, before anything is written
    drop_weight(folder / "model.safetensors", "multi_modal_projector", "linear_2.bias")
    with pytest.raises(ValueError, match=r"missing: .*multi_modal_projector\.linear_2\.bias"):
        convert(str(folder), tmp_path / "again")
    assert not (tmp_path / "again").exists()


def drop_weight(file: Path, part: str, name: str) -> None:
    """Remove the weight of `part` ending in `name` from a safetensors file (key layouts vary with the saver)."""
    weights = load_file(file)
    (key,) = [key for key in weights if part in key and key.endswith(name)]
    del weights[key]
    save_file(weights, file, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"vision_feature_select_strategy": "default"}, "gives the LLM 15 tokens per image"),  # a SigLIP patch dropped
        ({"vision_feature_layer": [-2, -1]}, "concatenates several encoder layers"),
        ({"model_type": "llava_next"}, "takes LlavaForConditionalGeneration checkpoints"),
    ],
)
def test_a_llava_whose_image_tokens_sparsecut_cannot_make_is_refused_with_the_reason(change, reason, tmp_path):
    folder = tmp_path / "llava"
    tiny_llava(folder, "qwen2", "siglip")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=reason):
        convert(str(folder), tmp_path / "out")


def test_build_refuses_a_llava_folder_and_names_the_convert_command(tmp_path):
    folder = tmp_path / "llava"
    tiny_llava(folder, "llama", "clip")
    with pytest.raises(ValueError, match="sparsecut convert"):
        build(vision=str(folder), llm=tiny_text_config(), tokenizer=byte_tokenizer())
    with pytest.raises(ValueError, match="sparsecut convert"):
        build(vision=tiny_vision_config(), llm=str(folder))
    with pytest.raises(ValueError, match="sparsecut convert"):
        load_model(folder, device="cpu")


def test_an_encoder_checkpoint_with_a_missing_weight_is_an_error_not_random_weights(tmp_path):
    from transformers import CLIPVisionModel

    CLIPVisionModel(tiny_vision_config("clip")).save_pretrained(tmp_path / "encoder")
    drop_weight(tmp_path / "encoder" / "model.safetensors", "", "post_layernorm.weight")
    with pytest.raises(ValueError, match=r"missing: .*post_layernorm\.weight"):
        build(vision=str(tmp_path / "encoder"), llm=tiny_text_config(), tokenizer=byte_tokenizer())


class ForceFirst(LogitsProcessor):
    """Make the first generated token `token` (the model emitting its own image token)."""

    def __init__(self, prompt_length: int, token: int):
        self.prompt_length, self.token = prompt_length, token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.prompt_length:
            scores = torch.full_like(scores, -float("inf"))
            scores[:, self.token] = 0
        return scores


def test_an_emitted_image_token_is_an_ordinary_token_as_in_llava(tmp_path):
    folder = tmp_path / "llava"
    llava = tiny_llava(folder, "llama", "clip")
    model, processor = load_model(convert(str(folder), tmp_path / "out", fusion="cross_attention"), device="cpu")
    theirs, ours = llava_inputs(folder, processor)
    image_token = model.config.image_token_id
    length = ours["input_ids"].shape[1]
    force = LogitsProcessorList([ForceFirst(length, image_token)])
    greedy = dict(max_new_tokens=5, do_sample=False, logits_processor=force)

    tokens = model.generate(**ours, **greedy)

    assert int(tokens[0, length]) == image_token
    assert torch.equal(tokens, llava.generate(**theirs, **greedy))


def test_the_experiments_llava_variant_is_llava_1_5(source):
    """configs/compare.yaml's "llava" baseline, built on a LLaVA's backbones with its weights, gives its logits."""
    folder, llava = source
    spec = yaml.safe_load((ROOT / "configs" / "compare.yaml").read_text())
    raw_base = yaml.safe_load((ROOT / "configs" / spec["base"]).read_text())
    train_config = variant_config(raw_base, ROOT / "configs", "llava", spec["variants"]["llava"], {}, Path("runs"))
    overrides = train_config.model["config"]
    assert {key: overrides.get(key) for key in LLAVA_1_5} == LLAVA_1_5
    assert overrides.get("image_token_scale") is None

    tokenizer = AutoProcessor.from_pretrained(folder).tokenizer
    model, _ = build(vision=llava.config.vision_config, llm=llava.config.text_config, tokenizer=tokenizer, **overrides)
    weights = {sparsecut_key(key): value for key, value in llava.state_dict().items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(key.startswith("shortcuts.") for key in missing)
    theirs = AutoProcessor.from_pretrained(folder)(
        images=random_image(2), text="USER: <image>\nWhat is it? ASSISTANT:", return_tensors="pt"
    )
    views = theirs["pixel_values"][:, None].expand(-1, model.config.num_views, -1, -1, -1)
    with torch.no_grad():
        assert torch.equal(
            model.eval()(input_ids=theirs["input_ids"], pixel_values=views).logits, llava(**theirs).logits
        )


def test_the_convert_command_writes_a_loadable_checkpoint(tmp_path, capsys):
    folder = tmp_path / "llava"
    tiny_llava(folder, "qwen2", "siglip", projector_bias=False)
    main(["convert", str(folder), str(tmp_path / "out"), "--fusion", "concat_mlp", "--schedule", "uniform:2"])
    assert "wrote" in capsys.readouterr().out
    model, processor = load_model(tmp_path / "out", device="cpu")
    assert model.config.fusion == "concat_mlp" and model.fusion.projector.linear_1.bias is None
    assert processor.resize == "squash" and not processor.pad_to_square
