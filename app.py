"""The sparsecut demo: chat with a SparseCut model and look into its shortcuts and fusion.

python app.py                      # the default model in weights/, on the best device, at http://127.0.0.1:7860
python app.py --model tiny         # a tiny random model (development, tests; answers are gibberish)
python app.py --model PATH --quantization 8bit --device cuda --port 7861 --share

Without a default model in weights/ the app says so and exits with status 1 (it does not fall back to the
tiny model silently: its answers would look like a broken trained model). A --quantization that bitsandbytes
cannot give here (not installed, or no kernels for the device) falls back to none, with a note. On Hugging
Face Spaces it runs the same way (Spaces sets the host and port through GRADIO_SERVER_NAME / GRADIO_SERVER_PORT).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

# First: on a ZeroGPU Space, `spaces` must be imported before torch initialises CUDA.
from demo.hosting import ensure_base_llm

QUANTIZATIONS = ("none", "8bit", "4bit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=None, help="checkpoint path or hub id; 'tiny' for a tiny random model (default: weights/)"
    )
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=None,
        help="bitsandbytes quantization (default: 4bit on CUDA; none on the CPU, where its kernels are slower "
        "than float32 for a model this small)",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="upper limit of the answer length")
    parser.add_argument(
        "--session-ttl", type=float, default=900, help="seconds an idle chat is kept before it expires (default 900)"
    )
    parser.add_argument(
        "--file-max-age",
        type=float,
        default=600,
        help="seconds before files that no request holds and no chat shows are deleted (default 600)",
    )
    return parser.parse_args(argv)


def quiet_unused_kernels_advice(quantization: str | None) -> None:
    """bitsandbytes, imported by peft whenever it is installed, advises installing `kernels` for its CPU 4-bit
    matmuls; say nothing of it unless 4-bit is what runs."""
    if quantization != "4bit":
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_unused_kernels_advice(args.quantization)
    ensure_base_llm()
    # Imported here, after `demo.hosting` and the arguments: torch and Gradio take seconds to import.
    from demo.engine import ChatEngine
    from demo.examples import load_examples
    from demo.ui import build_demo, launch

    print(f"Loading {args.model or 'the default model (weights/)'} on device={args.device} ...", flush=True)
    started = time.perf_counter()
    try:
        engine = ChatEngine.load(args.model, args.quantization, args.device, args.max_new_tokens)
    except (FileNotFoundError, OSError, ValueError, ImportError, RuntimeError) as error:
        print(f"app.py: cannot load the model: {error}", file=sys.stderr)
        if args.model is None:
            print(
                "app.py: pass --model PATH for a checkpoint, or --model tiny for a tiny random model.", file=sys.stderr
            )
        raise SystemExit(1) from None
    print(f"Loaded in {time.perf_counter() - started:.1f} s: {engine.describe(markdown=False)}", flush=True)
    for notice in engine.notices:  # also logged; printed so it shows without logging set up
        print(f"app.py: note: {notice}", file=sys.stderr, flush=True)
    demo = build_demo(engine, load_examples(), session_ttl=args.session_ttl)
    launch(demo, host=args.host, port=args.port, share=args.share, file_max_age=args.file_max_age)


if __name__ == "__main__":
    # Refused inputs and errors (with their tracebacks) are logged here, never shown on the page.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
