"""`sparsecut bench --quick`: a well-formed report with every variant and field (no timing thresholds here)."""

import importlib.util
import json
import math

import pytest

from benchmarks.bench import VARIANTS, Stat, bench
from sparsecut.cli import main

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


def test_quick_bench_has_every_variant_and_field(quick_report):
    report, _ = quick_report
    settings = report["settings"]
    assert settings["runs"] >= 2 and settings["warmup"] >= 1
    groups: dict[str, dict[str, dict]] = {}
    for result in report["results"]:
        groups.setdefault(result["precision"], {})[result["variant"]] = result
    assert sorted(groups) == sorted(PRECISIONS)
    for precision, group in groups.items():
        assert sorted(group) == sorted(VARIANTS), precision
        for result in group.values():
            for name in STATS:
                check_stat(result[name], settings["runs"])
            check_stat(result["other_ms"], settings["runs"], positive=False)
            assert result["new_tokens"] == settings["new_tokens"]
            assert isinstance(result["llm_weight_bytes_per_token"], int) and result["llm_weight_bytes_per_token"] > 0
            assert result["bandwidth_fraction"] is None  # CPU: no HBM bound
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
    assert primary == {
        "TTFT sparsecut / llava",
        "decode tok/s sparsecut / llava",
        "TTFT appended / sparsecut",
        "TTFT overhead of the demo statistics",
    }
    for target in report["targets"]:
        assert isinstance(target["value"], float) and math.isfinite(target["value"])
        assert isinstance(target["passed"], bool)
        assert target["comparison"] in ("<=", ">=")


def test_cli_entry_writes_the_files(tmp_path, capsys):
    main(["bench", "--quick", "--quantization", "none", "--out-dir", str(tmp_path)])
    report = json.loads((tmp_path / next(p.name for p in tmp_path.glob("cpu-*-none-quick.json"))).read_text())
    assert report["command"] == "python -m sparsecut.cli bench --device cpu --quick --quantization none"
    assert {r["variant"] for r in report["results"]} == set(VARIANTS)
    assert {r["precision"] for r in report["results"]} == {"fp32"}
    assert list(tmp_path.glob("cpu-*-none-quick.md"))
    assert "| sparsecut |" in capsys.readouterr().out


def test_cli_rejects_compile_on_cpu(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--quick", "--compile", "--out-dir", str(tmp_path)])
    assert "CUDA" in capsys.readouterr().err


def test_stat_median_and_tails():
    stat = Stat.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert stat.median == 3.0 and stat.p90 == pytest.approx(4.6)
    throughput = Stat.of([5.0, 1.0, 3.0, 2.0, 4.0], higher_is_better=True)
    assert throughput.p90 == pytest.approx(1.4)  # the slow tail of a throughput
