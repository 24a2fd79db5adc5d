"""The `sparsecut` command line: typed entry functions, one subcommand each."""

from __future__ import annotations

import argparse
import json
import sys


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sparsecut", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    ask = commands.add_parser("generate", help=generate.__doc__)
    ask.add_argument("--model", default=None, help="checkpoint directory (default: weights/)")
    ask.add_argument("--image", default=None, help="image path (omit for a text-only question)")
    ask.add_argument("--prompt", required=True)
    ask.add_argument("--quantization", choices=["none", "8bit", "4bit"], default=None)
    ask.add_argument("--device", default="auto")
    ask.add_argument("--max-new-tokens", type=int, default=64)

    show = commands.add_parser("info", help=info.__doc__)
    show.add_argument("--model", default=None)

    timing = commands.add_parser("bench", help="time SparseCut against LLaVA-style and appended-tokens baselines")
    timing.add_argument("--model", default=None, help="checkpoint (default: weights/, else the default shape)")
    timing.add_argument("--quick", action="store_true", help="tiny model, few runs and tokens (CI smoke test)")
    timing.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    timing.add_argument(
        "--quantization", choices=["none", "8bit", "4bit"], default=None, help="only this precision (default: all)"
    )
    timing.add_argument("--out-dir", default="benchmarks/results")
    timing.add_argument("--compile", action="store_true", help="CUDA: static KV cache + torch.compile decode")
    timing.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")

    fit = commands.add_parser("train", help="run every stage of a training config (sparsecut/training/train.py)")
    fit.add_argument("config", help="training yaml (its first line says how to run it)")
    fit.add_argument("--no-resume", action="store_true", help="restart every stage from scratch")

    score = commands.add_parser("eval", help="answer and score a LLaVA-format test set per question family")
    score.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: weights/)")
    score.add_argument("--data", required=True, help="LLaVA-format test JSON with a `family` per record")
    score.add_argument("--out-dir", default=None)
    score.add_argument("--limit", type=int, default=None)
    score.add_argument("--batch-size", type=int, default=16)
    score.add_argument("--device", default="auto")
    score.add_argument("--max-new-tokens", type=int, default=128, help="enough for an 8-object description")
    score.add_argument("--families", nargs="+", default=None, help="only these question families")
    score.add_argument(
        "--high-res-overlap",
        choices=["on", "off"],
        default=None,
        help="override the checkpoint's overlapping high-res crops (default: as saved)",
    )

    compare = commands.add_parser("experiment", help="train and score model variants with one recipe")
    compare.add_argument("config", help="experiment yaml (sparsecut/training/experiment.py)")
    compare.add_argument("--variants", nargs="+", default=None,
                         help="run only these variants; the table still lists every finished one (so several "
                              "such commands can run side by side)")

    look = commands.add_parser("probe", help="linear probes: which object attributes the image tokens carry")
    look.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: weights/)")
    look.add_argument("--data", default="data/shapesworld", help="ShapesWorld directory with both splits")
    look.add_argument("--train-images", type=int, default=1500,
                      help="images whose objects fit the probes (characters need ~8000)")
    look.add_argument("--test-images", type=int, default=600, help="images whose objects score them")
    look.add_argument("--out-dir", default=None, help="default: DATA/probe")
    look.add_argument("--device", default="auto")
    look.add_argument("--llm", action="store_true",
                      help="instead: follow the asked-for attribute through the LLM's layers (llm_probe.md)")
    look.add_argument("--families", nargs="+", default=None,
                      help="with --llm: question families (default: colour shape pattern character)")
    look.add_argument("--train-questions", type=int, default=1000, help="with --llm: questions per family to fit")
    look.add_argument("--test-questions", type=int, default=400, help="with --llm: questions per family to score")
    look.add_argument("--layers", type=int, nargs="+", default=None,
                      help="with --llm: hidden-state indices, 0 = input embeddings (default: every 4th and the last)")

    shapes = commands.add_parser("shapesworld", help="generate one split of the ShapesWorld VQA data")
    shapes.add_argument("out_dir")
    shapes.add_argument("--n-images", type=int, default=1000)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--image-size", type=int, default=128)
    shapes.add_argument("--split", default="train")
    shapes.add_argument("--questions-per-image", type=int, default=4,
                        help="questions recorded per image (the default recipes' training split: 8)")

    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            generate(args.model, args.image, args.prompt, args.quantization, args.device, args.max_new_tokens)
        elif args.command == "info":
            info(args.model)
        elif args.command == "bench":
            from benchmarks.bench import bench

            bench(args.model, args.quick, args.device, args.quantization, args.out_dir, args.compile, args.threads)
        elif args.command == "train":
            from .training.train import train

            print(train(args.config, resume=not args.no_resume))
        elif args.command == "eval":
            from .evaluation.evaluate import evaluate

            scores = evaluate(
                args.model, args.data, args.out_dir, args.limit, args.batch_size, args.device,
                max_new_tokens=args.max_new_tokens, families=args.families,
                high_res_overlap=None if args.high_res_overlap is None else args.high_res_overlap == "on",
            )
            print(json.dumps(scores, indent=2))
        elif args.command == "experiment":
            from .training.experiment import experiment

            results = experiment(args.config, args.variants)
            print(results.read_text())
            print(results)
        elif args.command == "probe":
            from .evaluation.probe import llm_probe, llm_probe_markdown, probe, to_markdown

            if args.llm:
                print(llm_probe_markdown(llm_probe(args.model, args.data, args.families, args.train_questions,
                                                   args.test_questions, args.layers, args.out_dir, args.device)))
            else:
                print(to_markdown(probe(args.model, args.data, args.train_images, args.test_images, args.out_dir,
                                        args.device)))
        elif args.command == "shapesworld":
            from .data.shapesworld import generate as generate_shapes

            print(generate_shapes(args.out_dir, args.n_images, args.seed, args.image_size, args.split,
                                      args.questions_per_image))
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as error:
        print(f"sparsecut {args.command}: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
