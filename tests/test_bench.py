"""`sparsecut bench --quick`: a well-formed report with every variant and field (no timing thresholds here)."""

import importlib.util
import json
import math

import pytest
import torch
from conftest import image_question, random_image

from benchmarks.bench import (
    LLAVA_1_5,
    PEER,
    UNMERGED,
    VARIANTS,
    PeerProcessor,
    Settings,
    Stat,
    bench,
    derive,
    generation_config,
    make_variants,
    transformers_llava,
)
from sparsecut.adapters import merge_lora
from sparsecut.cli import main
from sparsecut.testing import tiny_model

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}
STATS = ("preprocess_ms", "vision_ms", "fusion_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s", "peak_memory_mb")
PRECISIONS = ["fp32", "8bit", "4bit"] if importlib.util.find_spec("bitsandbytes") else ["fp32"]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    return bench(quick=True, out_dir=str(out_dir)), out_dir


def check_stat(stat: dict, runs: int, positive: bool = True) -> None:
    assert set(stat) == {"median", "p90", "runs"}
    assert len(stat["runs"]) == runs
    for value in [stat["median"], stat["p90"], *stat["runs"]]:
        assert isinstance(value, float) and math.isfinite(value)
        if positive:
            assert value > 0


def test_quick_bench_writes_json_and_markdown(quick_report):
    report, out_dir = quick_report
    json_files, md_files = list(out_dir.glob("cpu-*-quick.json")), list(out_dir.glob("cpu-*-quick.md"))
    assert len(json_files) == 1 and len(md_files) == 1
    assert report["files"] == {"json": str(json_files[0]), "markdown": str(md_files[0])}
    saved = json.loads(json_files[0].read_text())
    assert saved == {k: v for k, v in report.items() if k != "files"}
    assert saved["command"] == "python -m sparsecut.cli bench --device cpu --quick"
    machine = saved["machine"]
    for key in ("cpu_model", "platform", "python", "torch", "transformers"):
        assert isinstance(machine[key], str) and machine[key]
    assert isinstance(machine["torch_threads"], int) and machine["torch_threads"] > 0
    assert machine["gpu_name"] is None and machine["device"] == "cpu"
    markdown = md_files[0].read_text()
    assert "| target |" in markdown and report["command"] in markdown
    for variant in VARIANTS:
        assert f"| {variant} |" in markdown
    assert "memory bandwidth:" in markdown and "decode bound" in markdown
    assert "--quick measured " + report["model"] in markdown


def test_quick_bench_has_every_variant_and_field(quick_report):
    report, _ = quick_report
    settings = report["settings"]
    assert settings["runs"] >= 2 and settings["warmup"] >= 1
    groups: dict[str, dict[str, dict]] = {}
    for result in report["results"]:
        groups.setdefault(result["precision"], {})[result["variant"]] = result
    assert sorted(groups) == sorted(PRECISIONS)
    for precision, group in groups.items():
        expected = set(VARIANTS) if precision == "fp32" else set(VARIANTS) - {PEER}  # the peer: full precision
        assert set(group) - {UNMERGED} == expected, precision
        for result in group.values():
            for name in STATS:
                check_stat(result[name], settings["runs"])
            check_stat(result["other_ms"], settings["runs"], positive=False)
            assert result["new_tokens"] == settings["new_tokens"]
            assert isinstance(result["llm_weight_bytes_per_token"], int) and result["llm_weight_bytes_per_token"] > 0
            assert result["bandwidth_fraction"] > 0  # CPU: against the measured read bandwidth
            assert isinstance(result["description"], str) and result["description"]
            assert result["llm_input_tokens"] > result["image_tokens"] > 0
        sparsecut, appended = group["sparsecut"], group["appended"]
        assert group["llava"]["image_tokens"] == sparsecut["image_tokens"]
        assert group["llava"]["llm_input_tokens"] == sparsecut["llm_input_tokens"]
        assert appended["image_tokens"] == 5 * sparsecut["image_tokens"]
        assert appended["llm_input_tokens"] - sparsecut["llm_input_tokens"] == 4 * sparsecut["image_tokens"]
    # quantized weights are smaller than fp32 ones
    if "4bit" in groups:
        fp32, nf4 = groups["fp32"]["sparsecut"], groups["4bit"]["sparsecut"]
        assert nf4["llm_weight_bytes_per_token"] < fp32["llm_weight_bytes_per_token"]


def test_quick_bench_reports_the_targets(quick_report):
    report, _ = quick_report
    primary = {t["name"] for t in report["targets"] if t["primary"]}
    assert primary >= {
        "TTFT sparsecut / llava",
        "decode tok/s sparsecut / llava",
        f"TTFT sparsecut / {PEER}",
        f"decode tok/s sparsecut / {PEER}",
        "TTFT appended / sparsecut",
        "TTFT overhead of the demo statistics",
        "decode sparsecut / bandwidth bound",
    }
    assert report["machine"]["memory_read_bandwidth_gbs"] > 0
    for target in report["targets"]:
        assert isinstance(target["value"], float) and math.isfinite(target["value"])
        assert isinstance(target["passed"], bool)
        assert target["comparison"] in ("<=", ">=")


def test_cli_entry_writes_the_files(tmp_path, capsys):
    main(["bench", "--quick", "--quantization", "none", "--out-dir", str(tmp_path)])
    report = json.loads((tmp_path / next(p.name for p in tmp_path.glob("cpu-*-none-quick.json"))).read_text())
    assert report["command"] == "python -m sparsecut.cli bench --device cpu --quick --quantization none"
    assert {r["variant"] for r in report["results"]} - {UNMERGED} == set(VARIANTS)
    assert {r["precision"] for r in report["results"]} == {"fp32"}
    assert list(tmp_path.glob("cpu-*-none-quick.md"))
    assert "| sparsecut |" in capsys.readouterr().out


def test_the_llava_variant_is_llava_1_5():
    model, processor = tiny_model(fusion="concat_mlp", high_res_grid=2, image_token_scale="auto")
    llava, llava_processor = derive(model, processor, **LLAVA_1_5)
    config = llava.config
    assert (config.fusion, config.high_res_grid, config.feature_layer) == ("none", 1, -2)
    assert config.num_shortcuts == 0 and config.image_token_scale is None
    assert llava.fusion.projector.output_norm is None
    assert llava.language_model is model.language_model and llava.vision_tower is model.vision_tower


@torch.no_grad()
def test_the_transformers_peer_computes_what_the_llava_variant_computes():
    # The peer carries the same weights by name; where it computes the same thing, its timings compare like
    # for like. concat_mlp widens the projector's input: the peer gets its low-res columns, as the variant does.
    model, processor = tiny_model(fusion="concat_mlp", high_res_grid=2, image_token_scale="auto")
    variants = {variant.name: variant for variant in make_variants(model, processor)}
    llava, peer = variants["llava"], variants[PEER]
    assert isinstance(peer.processor, PeerProcessor) and type(peer.model).__name__ == "LlavaForConditionalGeneration"
    messages = image_question(random_image(5), "What is there?")
    mine = llava.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    theirs = peer.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert theirs["pixel_values"].ndim == 4
    with llava.active():
        torch.testing.assert_close(peer.model(**theirs).logits, llava.model(**mine).logits, rtol=0, atol=1e-5)
        expected = llava.model.generate(**mine, max_new_tokens=6, do_sample=False)
    answer = peer.model.generate(**theirs, max_new_tokens=6, do_sample=False)
    prompt = mine["input_ids"].shape[1]  # the prompts differ in the placeholder id only
    assert answer[:, prompt:].tolist() == expected[:, prompt:].tolist()
    assert transformers_llava(model, llava.model)[0].lm_head.weight.data_ptr() == (
        model.get_output_embeddings().weight.data_ptr()
    )  # shared, not copied


@torch.no_grad()
def test_the_compiled_static_cache_decode_gives_the_eager_tokens():
    # The faster loop must decode exactly as the eager reference does, also on a model whose merged adapters are
    # swapped for the base weights between conversations (lora_needs_image): image, then text only.
    model, processor = tiny_model(lora=LORA, lora_needs_image=True)
    generator = torch.Generator().manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    merge_lora(model, keep_base=True)
    for image in (random_image(6), None):
        inputs = processor.apply_chat_template(
            image_question(image, "What is there?"), add_generation_prompt=True, tokenize=True, return_dict=True
        )
        eager = model.generate(**inputs, generation_config=generation_config(model, Settings(0, 1, 12)))
        compiled_config = generation_config(model, Settings(0, 1, 12), compile=True)
        assert compiled_config.cache_implementation == "static"
        compiled = model.generate(**inputs, generation_config=compiled_config)
        assert hasattr(model, "_compiled_call")  # transformers compiled the decode steps (forced on the CPU)
        assert compiled.tolist() == eager.tolist()


def test_stat_median_and_tails():
    stat = Stat.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert stat.median == 3.0 and stat.p90 == pytest.approx(4.6)
    throughput = Stat.of([5.0, 1.0, 3.0, 2.0, 4.0], higher_is_better=True)
    assert throughput.p90 == pytest.approx(1.4)  # the slow tail of a throughput
