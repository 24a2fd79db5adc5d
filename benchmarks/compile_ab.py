"""Before / after of the library change the compiled decode path needed (sparsecut/modeling.py).

`sparsecut bench --compile` (CUDA) decodes with a static KV cache through torch.compile. Before the change,
`_embed_with_images` read the image-token count back (`int(image_mask.sum())`) in every decode step, which is
a graph break: two graphs per step and, on CUDA, a host sync between them. Now the check runs eagerly only.

This script forces the compiled path on the CPU (transformers compiles only on CUDA unless forced) and, in one
process per phase, measures eager and compiled decoding interleaved, and counts graph breaks: phase "before"
puts the old read-back back in front of the current method, phase "after" runs the library as it is.

    python benchmarks/compile_ab.py [--shape default|quick] [--runs 5] [--new-tokens 64]

writes benchmarks/results/compile-ab-<device>-<cpu model>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def phase(name: str, shape: str, runs: int, new_tokens: int) -> dict:
    import numpy as np
    import torch
    from torch._dynamo.utils import counters

    from sparsecut import bench
    from sparsecut.modeling import SparseCutForConditionalGeneration

    if name == "before":
        current = SparseCutForConditionalGeneration._embed_with_images

        def embed_before(self, input_ids, features):  # the read-back as it was in every decode step
            if features is None and int((input_ids == self.config.image_token_id).sum()):
                raise ValueError("image tokens but no pixel_values")
            return current(self, input_ids, features)

        SparseCutForConditionalGeneration._embed_with_images = embed_before

    torch.set_num_threads(1)  # see `bench(threads=...)`: the machine is shared
    device = torch.device("cpu")
    build = bench.build_default_shape if shape == "default" else bench.build_quick_shape
    model, processor = build(torch.float32, device)
    variant = bench.make_variants(model, processor)[0]  # SparseCut
    messages = bench.request()
    modes = {
        "eager": bench.Settings(0, 0, new_tokens),
        "compiled": bench.Settings(0, 0, new_tokens, compile=True),
    }
    for settings in modes.values():  # warm-up, compilation included
        bench.measure(variant, messages, settings, device)
    breaks = sum(counters["graph_break"].values())
    speeds: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(runs):  # interleaved, as in the bench
        for mode, settings in modes.items():
            speeds[mode].append(bench.measure(variant, messages, settings, device).decode_tokens_per_s)
    ratios = [c / e for c, e in zip(speeds["compiled"], speeds["eager"])]
    return {
        "phase": name,
        "graph_breaks_while_compiling": breaks,
        "eager_tokens_per_s": bench.Stat.of(speeds["eager"], higher_is_better=True).__dict__,
        "compiled_tokens_per_s": bench.Stat.of(speeds["compiled"], higher_is_better=True).__dict__,
        "compiled_over_eager": float(np.median(ratios)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["default", "quick"], default="default")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--phase", choices=["before", "after"], help=argparse.SUPPRESS)  # the child processes
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args.shape, args.runs, args.new_tokens)))
        return

    from sparsecut.bench import cpu_model, slug

    phases = []
    for name in ("before", "after"):  # one process each: the old method must not share compiled code
        command = [sys.executable, __file__, "--phase", name, "--shape", args.shape]
        command += ["--runs", str(args.runs), "--new-tokens", str(args.new_tokens)]
        out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        phases.append(json.loads(out.strip().splitlines()[-1]))
    report = {
        "command": f"python benchmarks/compile_ab.py --shape {args.shape} --runs {args.runs} "
        f"--new-tokens {args.new_tokens}",
        "what": "SparseCut decode, eager vs static cache + torch.compile (forced on the CPU), 1 torch thread, "
        "interleaved; before = int(image_mask.sum()) read back in every decode step, after = eager-only check",
        "cpu": cpu_model(),
        "phases": phases,
    }
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"compile-ab-cpu-{slug(cpu_model())}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print("| phase | graph breaks | eager tok/s | compiled tok/s | compiled / eager (median of per-round ratios) |")
    print("|---|---|---|---|---|")
    for p in phases:
        eager, compiled = p["eager_tokens_per_s"]["median"], p["compiled_tokens_per_s"]["median"]
        print(
            f"| {p['phase']} | {p['graph_breaks_while_compiling']} | {eager:.2f} | {compiled:.2f} "
            f"| {p['compiled_over_eager']:.3f} |"
        )
    print(f"written: {path}")


if __name__ == "__main__":
    main()
