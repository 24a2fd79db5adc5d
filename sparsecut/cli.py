"""The `sparsecut` command line: typed entry functions, one subcommand each.

`COMMANDS` is the table: each subcommand's help, its arguments and the function its arguments are passed to.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path


def generate(
    model: str | None,
    image: str | None,
    prompt: str,
    quantization: str | None = None,
    device: str = "auto",
    max_new_tokens: int = 64,
) -> str:
    """Answer one question about one image (or a text-only question) and print the answer as it streams."""
    from threading import Thread

    from transformers import TextIteratorStreamer

    from .build import load_model

    loaded, processor = load_model(model, quantization=quantization, device=device)
    content = ([{"type": "image", "image": image}] if image else []) + [{"type": "text", "text": prompt}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True
    ).to(loaded.device)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    worker = Thread(
        target=loaded.generate, kwargs=dict(**inputs, streamer=streamer, max_new_tokens=max_new_tokens, do_sample=False)
    )
    worker.start()
    pieces = []
    for piece in streamer:
        print(piece, end="", flush=True)
        pieces.append(piece)
    worker.join()
    print()
    return "".join(pieces)


def info(model: str | None) -> None:
    """Print a saved model's architecture summary: backbones, fusion, shortcut schedule, token counts."""
    from .build import DEFAULT_WEIGHTS
    from .configuration import SparseCutConfig

    config = SparseCutConfig.from_pretrained(model or str(DEFAULT_WEIGHTS))
    pairs = ", ".join(f"v{v}->l{layer}" for v, layer in zip(config.shortcut_vision_layers, config.shortcut_llm_layers))
    print(
        f"vision encoder : {config.vision_config.model_type}, {config.vision_depth} layers, "
        f"{config.image_size}px / {config.patch_size}px patches"
    )
    print(
        f"LLM            : {config.text_config.model_type}, {config.llm_depth} layers, "
        f"hidden {config.text_config.hidden_size}"
    )
    print(
        f"fusion         : {config.fusion}, high-res grid {config.high_res_grid}x{config.high_res_grid}"
        f"{' (overlapping crops)' if config.high_res_overlap else ''}, feature layer {config.feature_layer}"
    )
    print(f"shortcuts      : {pairs or 'none'}")
    print(f"image tokens   : {config.num_image_tokens} per image, {config.num_views} views")


def bench(
    model: str | None,
    quick: bool = False,
    device: str = "cpu",
    quantization: str | None = None,
    out_dir: str = "benchmarks/results",
    compile: bool = False,
    threads: int | None = None,
) -> None:
    """Time SparseCut against LLaVA-style and appended-tokens baselines (benchmarks/bench.py).

    The benchmark lives beside the other benchmarks in the source checkout, not in the installed package, so this
    command needs a checkout (an editable install, `pip install -e .`, points here from anywhere).
    """
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / "benchmarks" / "bench.py").is_file():
        raise FileNotFoundError(
            f"benchmarks/bench.py is not beside this sparsecut package ({checkout}); `sparsecut bench` runs from a "
            "source checkout (`pip install -e .` in one)"
        )
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    from benchmarks.bench import bench as run_bench

    run_bench(model, quick, device, quantization, out_dir, compile, threads)


def train(config: str, no_resume: bool = False) -> None:
    """Run every stage of a training config (sparsecut/training/train.py) and print where the model went."""
    from .training.train import train as run_training

    print(run_training(config, resume=not no_resume))


def evaluate(
    model: str | None,
    data: str,
    out_dir: str | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "auto",
    max_new_tokens: int = 128,
    families: list[str] | None = None,
    high_res_overlap: str | None = None,
) -> None:
    """Answer and score a LLaVA-format test set per question family; print the scores as JSON."""
    from .evaluation.evaluate import evaluate as run_evaluation

    scores = run_evaluation(
        model,
        data,
        out_dir,
        limit,
        batch_size,
        device,
        max_new_tokens=max_new_tokens,
        families=families,
        high_res_overlap=None if high_res_overlap is None else high_res_overlap == "on",
    )
    print(json.dumps(scores, indent=2))


def experiment(config: str, variants: list[str] | None = None) -> None:
    """Train and score model variants with one recipe; print the results table and where it is."""
    from .training.experiment import experiment as run_experiment

    results = run_experiment(config, variants)
    print(results.read_text())
    print(results)


def probe(
    model: str | None,
    data: str = "data/shapesworld",
    train_images: int = 1500,
    test_images: int = 600,
    out_dir: str | None = None,
    device: str = "auto",
    llm: bool = False,
    families: list[str] | None = None,
    train_questions: int = 1000,
    test_questions: int = 400,
    layers: list[int] | None = None,
) -> None:
    """Linear probes of what the image tokens carry (or, with `llm`, the LLM's layers); print the table."""
    from .evaluation.probe import llm_probe, llm_probe_markdown, to_markdown
    from .evaluation.probe import probe as run_probe

    if llm:
        results = llm_probe(model, data, families, train_questions, test_questions, layers, out_dir, device)
        print(llm_probe_markdown(results))
    else:
        print(to_markdown(run_probe(model, data, train_images, test_images, out_dir, device)))


def shapesworld(
    out_dir: str,
    n_images: int = 1000,
    seed: int = 0,
    image_size: int = 128,
    split: str = "train",
    questions_per_image: int = 4,
    phrasing: str = "standard",
) -> None:
    """Generate one split of the ShapesWorld VQA data; print the path of its LLaVA JSON file."""
    from .data.shapesworld import generate_dataset

    print(generate_dataset(out_dir, n_images, seed, image_size, questions_per_image, split, phrasing))


def world_check(
    model: str | None,
    fit: str | None = None,
    calibrate: str | None = None,
    world: str = "the images it was trained on",
    quantile: float = 0.995,
    report: str | None = None,
) -> None:
    """Fit a checkpoint's out-of-world check (--fit, --calibrate), or report what it flags (--report)."""
    from .evaluation import world_check as check

    if report is not None:
        print(json.dumps(check.report(model, report), indent=2))
    elif fit is None or calibrate is None:
        raise ValueError("give --fit and --calibrate (image globs) to fit a check, or --report IMAGES to test one")
    else:
        print(check.fit_for_checkpoint(model, fit, calibrate, world, quantile))


def text_only(model: str | None, out_dir: str | None = None, max_new_tokens: int = 48) -> None:
    """Compare a checkpoint's text-only answers with its base LLM's; print the share equal and the mean KL."""
    from .evaluation.text_only import text_only as compare

    result = compare(model, out_dir, max_new_tokens)
    for row in result["answers"]:
        print(f"{'=' if row['equal'] else '≠'} {row['prompt']!r}: {row['model']!r}")
    print(f"{result['n']} prompts, equal {result['equal']:.3f}, mean KL to the base {result['mean_kl']:.2e} nats/token")


def pointing(
    model: str | None,
    data: str | None = None,
    generate: int | None = None,
    per_family: int = 70,
    families: list[str] | None = None,
    out_dir: str | None = None,
    device: str = "cpu",
    quantization: str | None = None,
    seed: int = 0,
) -> dict:
    """Pointing game: does each map of an answer point at the object the question is about? (per family)"""
    from .evaluation.pointing import FAMILIES, to_markdown
    from .evaluation.pointing import pointing as play

    summary = play(
        model,
        data=data,
        generate=generate,
        per_family=per_family,
        families=families or FAMILIES,
        out_dir=out_dir,
        device=device,
        quantization=quantization,
        seed=seed,
        command=shlex.join(
            ["sparsecut", "pointing", *_flags(model, data, generate, per_family, families, quantization)]
        ),
    )
    print(to_markdown(summary))
    return summary


def _flags(model, data, generate, per_family, families, quantization) -> list[str]:
    """The arguments of a `sparsecut pointing` command that differ from the defaults (the output folder aside)."""
    flags = [model] if model else []
    flags += ["--data", data] if data else ["--generate", str(generate)]
    flags += ["--per-family", str(per_family)] if data and per_family != 70 else []
    flags += ["--families", *families] if families else []
    return flags + (["--quantization", quantization] if quantization else [])


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the default model)")
    parser.add_argument("--image", default=None, help="image path (omit for a text-only question)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--quantization", choices=["none", "8bit", "4bit"], default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=64)


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None)


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint (default: the default model, else its shape)")
    parser.add_argument("--quick", action="store_true", help="tiny model, few runs and tokens (CI smoke test)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--quantization", choices=["none", "8bit", "4bit"], default=None, help="only this precision (default: all)"
    )
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--compile", action="store_true", help="CUDA: static KV cache + torch.compile decode")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training yaml (its first line says how to run it)")
    parser.add_argument("--no-resume", action="store_true", help="restart every stage from scratch")


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the default model)")
    parser.add_argument("--data", required=True, help="LLaVA-format test JSON with a `family` per record")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="enough for an 8-object description")
    parser.add_argument("--families", nargs="+", default=None, help="only these question families")
    parser.add_argument(
        "--high-res-overlap",
        choices=["on", "off"],
        default=None,
        help="override the checkpoint's overlapping high-res crops (default: as saved)",
    )


def _experiment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment yaml (sparsecut/training/experiment.py)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="run only these variants; the table still lists every finished one (so several such commands can run "
        "side by side)",
    )


def _probe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the default model)")
    parser.add_argument("--data", default="data/shapesworld", help="ShapesWorld directory with both splits")
    parser.add_argument(
        "--train-images", type=int, default=1500, help="images whose objects fit the probes (characters need ~8000)"
    )
    parser.add_argument("--test-images", type=int, default=600, help="images whose objects score them")
    parser.add_argument("--out-dir", default=None, help="default: DATA/probe")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--llm",
        action="store_true",
        help="instead: follow the asked-for attribute through the LLM's layers (llm_probe.md)",
    )
    parser.add_argument(
        "--families",
        nargs="+",
        default=None,
        help="with --llm: question families (default: colour shape pattern character)",
    )
    parser.add_argument("--train-questions", type=int, default=1000, help="with --llm: questions per family to fit")
    parser.add_argument("--test-questions", type=int, default=400, help="with --llm: questions per family to score")
    parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=None,
        help="with --llm: hidden-state indices, 0 = input embeddings (default: every 4th and the last)",
    )


def _shapesworld_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir")
    parser.add_argument("--n-images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--split", default="train")
    parser.add_argument(
        "--questions-per-image",
        type=int,
        default=4,
        help="questions recorded per image (the default recipes' training split: 8)",
    )
    parser.add_argument(
        "--phrasing",
        choices=["standard", "train", "heldout"],
        default="standard",
        help="fixed templates (the standard splits), or questions as people ask them, in words from the training "
        "or the held-out pool (sparsecut/data/shapesworld/phrasing.py)",
    )


def _world_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the default model)")
    parser.add_argument("--fit", default=None, help="glob of in-world images to fit the check on")
    parser.add_argument("--calibrate", default=None, help="glob of other in-world images that set the threshold")
    parser.add_argument("--world", default="the images it was trained on", help="what the world is, for users")
    parser.add_argument("--quantile", type=float, default=0.995, help="share of calibration images left inside")
    parser.add_argument("--report", default=None, help="glob of held-out in-world images: report what is flagged")


def _text_only_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the default model)")
    parser.add_argument("--out-dir", default=None, help="write every answer to OUT_DIR/text_only.json")
    parser.add_argument("--max-new-tokens", type=int, default=48)


def convert(
    source: str, out: str, fusion: str = "none", high_res_grid: int | None = None, schedule: str = "none"
) -> None:
    """Turn a LLaVA checkpoint (hub id or folder) into a SparseCut model that starts exactly equal to it."""
    from .convert import convert as run_conversion

    print(f"wrote {run_conversion(source, out, fusion=fusion, high_res_grid=high_res_grid, schedule=schedule)}")


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", help="a LlavaForConditionalGeneration checkpoint: a local folder or a hub id (llava-hf/...)"
    )
    parser.add_argument("out", help="the SparseCut checkpoint directory to write")
    parser.add_argument("--fusion", choices=["none", "concat_mlp", "cross_attention"], default="none")
    parser.add_argument(
        "--high-res-grid", type=int, default=None, help="high-res crops per side (default 1 with --fusion none, else 2)"
    )
    parser.add_argument("--schedule", default="none", help="shortcuts: none, uniform[:k] or reversed[:k]")


def _pointing_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the default model)")
    parser.add_argument("--data", default=None, help="LLaVA-format ShapesWorld questions beside their *_scenes.json")
    parser.add_argument(
        "--generate", type=int, default=None, help="instead: this many questions per family, made in code"
    )
    parser.add_argument(
        "--per-family", type=int, default=70, help="with --data: at most this many questions per family"
    )
    parser.add_argument("--families", nargs="+", default=None, help="default: colour shape pattern character position")
    parser.add_argument("--out-dir", default=None, help="write pointing.json and pointing.md here")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quantization", choices=["none", "8bit", "4bit"], default=None)
    parser.add_argument("--seed", type=int, default=0, help="with --generate: the scenes' seed")


# subcommand -> (entry function, its arguments). The parsed arguments are passed to the function by name, and
# the help is the first line of its docstring.
COMMANDS: dict[str, tuple[Callable[..., object], Callable[[argparse.ArgumentParser], None]]] = {
    "generate": (generate, _generate_arguments),
    "info": (info, _info_arguments),
    "bench": (bench, _bench_arguments),
    "train": (train, _train_arguments),
    "eval": (evaluate, _evaluate_arguments),
    "experiment": (experiment, _experiment_arguments),
    "probe": (probe, _probe_arguments),
    "shapesworld": (shapesworld, _shapesworld_arguments),
    "world-check": (world_check, _world_check_arguments),
    "text-only": (text_only, _text_only_arguments),
    "convert": (convert, _convert_arguments),
    "pointing": (pointing, _pointing_arguments),
}


def parser() -> argparse.ArgumentParser:
    """The `sparsecut` argument parser, one subparser per entry of `COMMANDS`."""
    main_parser = argparse.ArgumentParser(prog="sparsecut", description=__doc__.splitlines()[0])
    commands = main_parser.add_subparsers(dest="command", required=True)
    for name, (function, add_arguments) in COMMANDS.items():
        add_arguments(commands.add_parser(name, help=function.__doc__.splitlines()[0]))
    return main_parser


def main(argv: list[str] | None = None) -> None:
    arguments = vars(parser().parse_args(argv))
    command = arguments.pop("command")
    try:
        COMMANDS[command][0](**arguments)
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as error:
        print(f"sparsecut {command}: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
