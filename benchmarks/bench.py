"""`sparsecut bench`: what SparseCut costs at inference, measured against its two baselines on the same weights.

For every variant the benchmark runs one chat request (one image + a short question, batch 1, greedy) end to
end through `processor.apply_chat_template` and `model.generate`, and records

- time to first token (TTFT), split into preprocessing (the processor), vision encoder, fusion and LLM
  prefill (embedding merge, the LLM forward with its shortcut hooks, the LM head) plus what is left (`other`:
  `generate`'s own set-up);
- decode speed in tokens/s over `new_tokens` generated tokens (EOS suppressed with min_new_tokens);
- peak memory (process RSS high-water mark on the CPU, `max_memory_allocated` on CUDA) and the LLM input length.

Variants, all built from ONE set of weights (the derived ones share the base model's modules, so nothing is
copied and no weight differs):

- `sparsecut`: the model as configured (1 + grid**2 views in one encoder batch, fusion, sparse shortcuts);
- `sparsecut+stats`: the same while collecting the demo statistics (`record_stats`: shortcut ratios, fusion
  attention maps), to price the introspection;
- `sparsecut-unmerged`: a checkpoint with LoRA adapters as trained (peft layers, `merge_adapters=False`), its own
  copy, beside the merged model that `load_model` gives for inference (full precision only);
- `llava`: LLaVA-1.5 as a config variant (`fusion="none", high_res_grid=1, schedule="none", feature_layer=-2`, no
  image-token norm) wrapped around the same encoder, projector and LLM: the encoder sees the low-res view only,
  no fusion block, no shortcut hooks;
- `transformers-llava`: transformers' own `LlavaForConditionalGeneration` carrying the same encoder, projector
  and LLM weights, mapped by name and shared (`llava_state_dict`); it computes exactly what `llava` computes
  (tests/test_bench.py), so it prices SparseCut's wrapper against the reference implementation. For concat_mlp the
  projector is the fusion projector's low-res columns, a timing stand-in (full precision only);
- `appended`: high-res tokens appended (`fusion="none", append_high_res_tokens=True`, no shortcuts): every
  view's tokens go through the same projector into the LLM input, (1 + grid**2) x the image tokens.

Each variant runs in fp32 (CPU) / bf16 (CUDA) and, where bitsandbytes is installed, 8-bit and 4-bit (nf4),
loaded through `load_model(..., quantization=...)`. On CUDA a 7B-class shape (CLIP ViT-L/14-336 + Llama-2-7B
shapes, random weights from configs) is added in bf16 and nf4. Decode speed is also given as a fraction of the
memory-bandwidth bound: bandwidth / LLM weight bytes read per token, with the peak HBM bandwidth on CUDA and, on
the CPU, the read bandwidth measured at the start of the run with the run's threads (`memory_read_bandwidth`).

Timings on a shared machine are noisy, so the targets are ratios within one run: the variants of a group are
interleaved round-robin (each round runs every variant once, in a rotated order) and every ratio is the median
of the per-round ratios, so background load hits all variants alike. On the CPU the same ratios are also
given from process CPU time, and `threads=1` keeps OpenMP threads from waiting on each other when other jobs
hold the cores. `compile=True` adds `sparsecut+compile` and `transformers-llava+compile`: the same models decoding
with a static KV cache through torch.compile (CUDA graphs on CUDA, inductor's C++ kernels on the CPU), interleaved
with the eager ones.

Results go to `benchmarks/results/<device>-<cpu or gpu model>[-<quantization>][-compile][-quick].json` and
`.md`: the machine (CPU model and threads, GPU and its bandwidth, library versions), the exact command, every
run, and the targets with pass/fail.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from sparsecut.build import DEFAULT_WEIGHTS, build, is_checkpoint, load_model
from sparsecut.configuration import SparseCutConfig
from sparsecut.convert import LLAVA_1_5 as CONVERTED_LLAVA_1_5
from sparsecut.convert import llava_key
from sparsecut.fusion import Projector
from sparsecut.modeling import SparseCutForConditionalGeneration
from sparsecut.processing import SparseCutProcessor
from sparsecut.testing import tiny_text_config, tiny_vision_config
from sparsecut.tokenization import byte_tokenizer
from sparsecut.training.pretrain_vision import DEFAULT_ENCODER
from sparsecut.utils import PeakMemory, markdown_table, release_memory

# --- what is measured ---------------------------------------------------------------------------------------
VARIANTS = ("sparsecut", "sparsecut+stats", "llava", "transformers-llava", "appended")
PEER = "transformers-llava"  # measured in the full-precision group only
UNMERGED = "sparsecut-unmerged"  # a checkpoint with LoRA adapters, full precision: as trained, adapters unmerged
QUANTIZED = ("8bit", "4bit")
PROMPT = "Describe this image in detail."
IMAGE_SIZE = (640, 480)  # a photo-sized input, so preprocessing does a real resize

# Without a checkpoint (no weights/ and no --model), the default model's shape (configs/default.yaml) with random
# encoder and fusion weights and the real SmolLM2-135M-Instruct.
DEFAULT_VISION = {
    **DEFAULT_ENCODER,
    "hidden_size": 192,
    "intermediate_size": 768,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
}
DEFAULT_SPARSECUT = dict(fusion="concat_mlp", high_res_grid=2, schedule="uniform:4", fusion_num_heads=4)
# CLIP ViT-L/14-336 + Llama-2-7B shapes (LLaVA-1.5-7B), random weights built from configs: nothing downloaded.
SEVEN_B_VISION = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
)
SEVEN_B_LLM = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
SEVEN_B_SPARSECUT = dict(fusion="cross_attention", high_res_grid=2, schedule="uniform:8", fusion_num_heads=16)

# Peak HBM bandwidth (GB/s) by GPU name, used only when the device properties lack the memory clock / bus width;
# more specific names first.
HBM_BANDWIDTH_GBS = {
    "H200": 4800,
    "H100 NVL": 3900,
    "H100 PCIe": 2000,
    "H100": 3350,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "A100": 1555,
    "L40S": 864,
    "L4": 300,
    "A10": 600,
    "RTX 4090": 1008,
    "V100": 900,
    "T4": 320,
}


@dataclass
class Settings:
    warmup: int  # un-recorded rounds first: lazy initialisation, allocator growth, kernel selection
    runs: int  # recorded rounds
    new_tokens: int  # generated per run; decode speed is measured over the last new_tokens - 1
    compile: bool = False  # add the "+compile" variants: static KV cache + torch.compile of the decode step


FULL = Settings(warmup=1, runs=5, new_tokens=128)
QUICK = Settings(warmup=1, runs=3, new_tokens=8)


# --- results ------------------------------------------------------------------------------------------------
@dataclass
class Stat:
    """Median and p90 over the recorded runs. For throughputs (higher is better) p90 is the slow tail, i.e. the
    10th percentile of tokens/s (the 90th percentile of the time per token)."""

    median: float
    p90: float
    runs: list[float]

    @classmethod
    def of(cls, values: list[float], higher_is_better: bool = False) -> Stat:
        tail = np.percentile(values, 10 if higher_is_better else 90)
        return cls(median=float(np.median(values)), p90=float(tail), runs=[float(v) for v in values])


@dataclass
class Run:
    """One measured request, times in milliseconds."""

    preprocess_ms: float
    vision_ms: float
    fusion_ms: float
    prefill_ms: float
    other_ms: float
    ttft_ms: float
    decode_tokens_per_s: float
    peak_memory_mb: float
    llm_input_tokens: int
    new_tokens: int
    # CPU only: the same from the process CPU time, which time slices taken by other processes do not inflate
    ttft_cpu_ms: float | None = None
    decode_cpu_tokens_per_s: float | None = None


@dataclass
class VariantResult:
    shape: str  # "default" / "quick" / "checkpoint" / "7b"
    precision: str  # "fp32", "bf16", "8bit", "4bit"
    variant: str
    description: str
    image_tokens: int  # LLM input tokens per image
    llm_input_tokens: int  # whole prompt, image tokens included
    new_tokens: int
    preprocess_ms: Stat
    vision_ms: Stat
    fusion_ms: Stat
    prefill_ms: Stat
    other_ms: Stat
    ttft_ms: Stat
    decode_tokens_per_s: Stat
    peak_memory_mb: Stat
    weights_mb: float  # all weights of the group's model (shared by its variants), quantization scales included
    llm_weight_bytes_per_token: int  # LLM weights read by one decode step (the input embedding reads one row)
    ttft_cpu_ms: Stat | None = None  # CPU only, see Run
    decode_cpu_tokens_per_s: Stat | None = None
    # memory bandwidth (CUDA: peak HBM; CPU: measured read bandwidth) / LLM weight bytes per token
    bandwidth_bound_tokens_per_s: float | None = None
    bandwidth_fraction: float | None = None  # measured decode tokens/s / the bound


@dataclass
class Target:
    name: str
    shape: str
    precision: str
    value: float  # median of the per-round ratios (robust to background load)
    threshold: float
    comparison: str  # "<=" or ">="
    passed: bool
    primary: bool = True  # the full-precision group (the targets); quantized groups are reported alongside
    ratio_of_medians: float | None = None
    cpu_time_value: float | None = None  # CPU: the same ratio from process CPU time, a cross-check under load
    cpu_time_passed: bool | None = None


@dataclass
class Machine:
    device: str
    cpu_model: str
    cpu_logical_cores: int | None
    cpu_physical_cores: int | None
    torch_threads: int
    memory_gb: float
    gpu_name: str | None
    gpu_memory_gb: float | None
    gpu_capability: str | None
    gpu_bandwidth_gbs: float | None
    gpu_bandwidth_source: str | None
    platform: str
    python: str
    torch: str
    transformers: str
    bitsandbytes: str | None
    cuda: str | None
    sparsecut_commit: str | None
    load_average_before: list[float] | None
    load_average_after: list[float] | None = None
    # CPU: the measured read bandwidth of main memory with the run's torch threads (`memory_read_bandwidth`)
    memory_read_bandwidth_gbs: float | None = None
    memory_bandwidth_source: str | None = None


@dataclass
class Report:
    command: str
    created: str
    model: str
    settings: Settings
    machine: Machine
    results: list[VariantResult] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    duration_s: float = 0.0


# --- timing -------------------------------------------------------------------------------------------------
def make_clock(device: torch.device) -> Callable[[], float]:
    """perf_counter, after a CUDA synchronise on the GPU so that queued kernels are counted where they run."""
    if device.type == "cuda":

        def clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return clock
    return time.perf_counter


class FirstToken(LogitsProcessor):
    """Timestamps the first logits `generate` processes: the prefill forward is done, the first token follows."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.time: float | None = None
        self.cpu_time: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.time is None:  # later steps are not timed: a sync per decode step would slow CUDA decoding
            self.time = self.clock()
            self.cpu_time = time.process_time()
        return scores


class StageTimer:
    """Forward hooks timing the first call of the vision encoder and of the fusion inside one `generate`."""

    def __init__(self, modules: dict[str, nn.Module], clock: Callable[[], float]):
        self.modules = modules
        self.clock = clock
        self.times: dict[str, float] = {}
        self._handles: list = []

    def __enter__(self) -> StageTimer:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._mark(f"{name}_start")))
            self._handles.append(module.register_forward_hook(self._mark(f"{name}_end")))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _mark(self, key: str):
        def hook(*_):
            self.times.setdefault(key, self.clock())

        return hook


# --- variants -----------------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    description: str
    model: SparseCutForConditionalGeneration
    processor: SparseCutProcessor
    stats: bool = False
    base: SparseCutForConditionalGeneration | None = None  # set for wrappers around the base model's modules
    compile: bool = False  # decode with a static KV cache through torch.compile (`generation_config`)

    def stage_modules(self) -> dict[str, nn.Module]:
        """The modules whose first call in a request is the vision encoder / the fusion (LLaVA: its projector)."""
        if isinstance(self.model, SparseCutForConditionalGeneration):
            return {"vision": self.model.vision_tower, "fusion": self.model.fusion}
        return {"vision": self.model.model.vision_tower, "fusion": self.model.model.multi_modal_projector}

    def image_tokens(self) -> int:
        """LLM input tokens per image."""
        config = self.model.config
        return config.num_image_tokens if isinstance(config, SparseCutConfig) else config.image_seq_length

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Wrappers share the base model's decoder layers: take its shortcut hooks off while they run, so the
        baselines run the stock LLM with no hook at all."""
        if self.base is None:
            yield
            return
        self.base.shortcuts.detach()
        try:
            yield
        finally:
            self.base.shortcuts.attach(self.base.decoder_layers)


def derive(
    model: SparseCutForConditionalGeneration, processor: SparseCutProcessor, **overrides
) -> tuple[SparseCutForConditionalGeneration, SparseCutProcessor]:
    """A baseline config of the same class around the SAME encoder, projector and LLM modules (no copy).

    overrides: SparseCutConfig fields (fusion, high_res_grid, feature_layer, append_high_res_tokens). The
    baseline has no shortcuts and LLaVA's projector (`baseline_projector`: no image-token norm).
    """
    base = model.config
    values = {k: v for k, v in base.to_dict().items() if k != "quantization_config"}
    values.update(schedule="none", shortcut_vision_layers=None, shortcut_llm_layers=None, image_token_scale=None)
    values.update(overrides)
    config = SparseCutConfig.from_dict(values)
    wrapper = SparseCutForConditionalGeneration(
        config, vision_tower=model.vision_tower, language_model=model.language_model
    )
    wrapper.fusion.projector = baseline_projector(model)
    wrapper.shortcuts.to(model.device)  # an empty gate; kept on the model's device for tidiness
    wrapper.generation_config = copy.deepcopy(model.generation_config)  # same EOS / pad ids as the base model
    wrapper.eval()
    baseline = SparseCutProcessor(
        processor.tokenizer,
        image_size=processor.image_size,
        high_res_grid=config.high_res_grid,
        num_image_tokens=config.num_image_tokens,
        image_mean=processor.image_mean,
        image_std=processor.image_std,
        pad_to_square=processor.pad_to_square,
        image_token=processor.image_token,
        padding_side=processor.padding_side,
        chat_template=processor.chat_template,
        resize=processor.resize,
        pad_color=processor.pad_color,
        content_items=processor.content_items,
    )
    return wrapper, baseline


def baseline_projector(model: SparseCutForConditionalGeneration) -> Projector:
    """The projector a fusion-free baseline uses, LLaVA's (linear, GELU, linear; no `ImageTokenNorm`): the
    model's own linear layers, or, when concat_mlp widened its input to (1 + grid**2) x d, a copy of the first
    restricted to the low-res token's columns (the first d)."""
    projector = model.fusion.projector
    d = model.config.vision_config.hidden_size
    if projector.linear_1.in_features == d:
        plain = Projector(d, projector.linear_1.out_features, model.config.projector_hidden_act)
        plain.linear_1, plain.linear_2 = projector.linear_1, projector.linear_2
        return plain
    weight = projector.linear_1.weight
    sliced = Projector(d, projector.linear_1.out_features, model.config.projector_hidden_act)
    sliced.to(weight.device, weight.dtype)
    with torch.no_grad():
        sliced.linear_1.weight.copy_(weight[:, :d])
        sliced.linear_1.bias.copy_(projector.linear_1.bias)
    sliced.linear_2 = projector.linear_2
    return sliced


def make_variants(
    model: SparseCutForConditionalGeneration, processor: SparseCutProcessor, peer: bool = True, compile: bool = False
) -> list[Variant]:
    """The base model's variants; `peer` adds transformers' LLaVA on the same weights (full precision only),
    `compile` the same model and peer decoding through torch.compile with a static KV cache."""
    config = model.config
    if config.fusion == "none" or config.append_high_res_tokens:
        raise ValueError("The benchmark compares a SparseCut model (fusion != 'none') with its baselines.")
    llava, llava_processor = derive(model, processor, **LLAVA_1_5)
    appended, appended_processor = derive(model, processor, fusion="none", append_high_res_tokens=True)
    pairs = ", ".join(f"v{v}->l{layer}" for v, layer in zip(model.shortcuts.vision_layers, model.shortcuts.llm_layers))
    variants = [
        Variant(
            "sparsecut",
            f"SparseCut: {config.num_views} views in one encoder batch, {config.fusion} fusion of "
            f"{len(config.fused_vision_layers)} layers in one call, {config.num_shortcuts} shortcuts ({pairs})",
            model,
            processor,
        ),
        Variant(
            "sparsecut+stats",
            "SparseCut collecting the demo statistics (record_stats: shortcut ratios, fusion attention maps)",
            model,
            processor,
            stats=True,
        ),
        Variant(
            "llava",
            "LLaVA-1.5 as a SparseCut config, same weights: low-res view only, encoder layer -2, projector only "
            "(no image-token norm), no shortcut hooks",
            llava,
            llava_processor,
            base=model,
        ),
        Variant(
            "appended",
            f"high-res tokens appended, same weights: all {config.num_views} views' tokens projected into the LLM "
            "input, no fusion, no shortcuts",
            appended,
            appended_processor,
            base=model,
        ),
    ]
    if peer:
        llava_peer, image_token_id = transformers_llava(model, llava)
        description = (
            "transformers' LlavaForConditionalGeneration carrying the same encoder, LLM and projector weights "
            "(mapped by name; the projector is the llava variant's, the fusion projector's low-res columns, a "
            "timing stand-in), same requests"
        )
        peer_processor = PeerProcessor(llava_processor, image_token_id, config.image_token_id)
        variants.insert(3, Variant(PEER, description, llava_peer, peer_processor))
    if compile:
        compiled = [
            replace(v, name=f"{v.name}+compile", description=f"{v.description}; {COMPILED}", compile=True)
            for v in variants
            if v.name in ("sparsecut", PEER)
        ]
        variants += compiled
    return variants


COMPILED = "decode steps through torch.compile with a static KV cache (eager prefill)"


# The `llava` variant: LLaVA-1.5's recipe as a SparseCut config (what transformers' LlavaForConditionalGeneration
# computes, too): the low-res view only, the penultimate encoder layer, the plain projector, no shortcuts.
LLAVA_1_5 = {**CONVERTED_LLAVA_1_5, "append_high_res_tokens": False}


# --- the transformers peer ----------------------------------------------------------------------------------
def llava_state_dict(model: SparseCutForConditionalGeneration, projector: Projector) -> dict[str, torch.Tensor]:
    """SparseCut weights under transformers' LlavaForConditionalGeneration names (tensors shared, not copied).

    The encoder and the LLM map one to one; LLaVA's projector is `projector` (`baseline_projector`: for concat_mlp
    the low-res token's columns of the fusion's first projector layer, a timing stand-in: the LLaVA peer reads
    one d-wide token per patch where the fusion reads 1 + grid**2). The fusion's input norm and image-token
    norm and the shortcut gates have no LLaVA counterpart and are left out.
    """
    state = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if (name := llava_name(key)) is not None:
            state[name] = tensor.detach()
    for key, tensor in projector.state_dict(keep_vars=True).items():
        state[f"model.multi_modal_projector.{key}"] = tensor.detach()
    return state


def llava_name(name: str) -> str | None:
    """The LlavaForConditionalGeneration name of a SparseCut encoder or LLM weight, else None (the fusion's
    weights have no one-to-one counterpart: `llava_state_dict` takes LLaVA's projector from elsewhere)."""
    return None if name.startswith("fusion.") else llava_key(name)


def transformers_llava(model: SparseCutForConditionalGeneration, llava: SparseCutForConditionalGeneration):
    """transformers' LlavaForConditionalGeneration carrying `model`'s weights, configured as the `llava`
    variant (`llava`: its encoder layer, projector and image-token count); returns (peer, image token id).

    The peer's placeholder is the last id of the LLM's vocabulary: LLaVA looks every input id up in the
    embeddings before it replaces the placeholders, and SparseCut's `<image>` lies just past the vocabulary."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = model.config
    image_token_id = config.text_config.vocab_size - 1
    peer_config = LlavaConfig(
        vision_config=copy.deepcopy(config.vision_config),
        text_config=copy.deepcopy(config.text_config),
        image_token_index=image_token_id,
        image_seq_length=llava.config.num_image_tokens,
        projector_hidden_act=config.projector_hidden_act,
        vision_feature_layer=llava.config.feature_layer,
        vision_feature_select_strategy="full",  # every patch token (LLaVA-1.5's CLIP drops a CLS token first)
        tie_word_embeddings=config.text_config.tie_word_embeddings,
    )
    peer_config._attn_implementation = model.language_model.config._attn_implementation
    dtype = model.language_model.dtype
    with torch.device("meta"):
        peer = LlavaForConditionalGeneration(peer_config)
    state = llava_state_dict(model, llava.fusion.projector)
    missing, unexpected = peer.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"SparseCut -> LLaVA names do not match: missing {missing}, unexpected {unexpected}.")
    # Buffers that are not saved (rotary frequencies, position ids) are not in a state dict: take them by name too.
    buffers = {llava_name(name): buffer for name, buffer in model.named_buffers()}
    for name, buffer in list(peer.named_buffers()):
        if buffer.is_meta:
            if name not in buffers:
                raise ValueError(f"{name} of the LLaVA peer has no SparseCut counterpart.")
            module_name, _, leaf = name.rpartition(".")
            peer.get_submodule(module_name)._buffers[leaf] = buffers[name]
    peer.generation_config = copy.deepcopy(model.generation_config)
    return peer.to(dtype=dtype).eval(), image_token_id


class PeerProcessor:
    """The `llava` variant's processor, with its output in LLaVA's form: the peer's placeholder id and
    pixel_values (images, 3, H, W). Preprocessing is the same work for both."""

    def __init__(self, processor: SparseCutProcessor, image_token_id: int, placeholder: int):
        self.processor, self.image_token_id, self.placeholder = processor, image_token_id, placeholder

    def apply_chat_template(self, messages: list[dict], **kwargs):
        inputs = self.processor.apply_chat_template(messages, **kwargs)
        ids = inputs["input_ids"]
        if bool((ids == self.image_token_id).any()):
            raise ValueError("The prompt already holds the LLaVA peer's placeholder id.")
        inputs["input_ids"] = ids.masked_fill(ids == self.placeholder, self.image_token_id)
        inputs["pixel_values"] = inputs["pixel_values"][:, 0]  # (images, 1, 3, H, W) -> the low-res view
        return inputs


# --- models -------------------------------------------------------------------------------------------------
@dataclass
class Group:
    """One model in one precision; its variants are measured interleaved."""

    shape: str
    precision: str
    load: Callable[[], tuple[SparseCutForConditionalGeneration, SparseCutProcessor]]
    # a checkpoint with LoRA adapters: the same model with its adapters unmerged, measured beside it
    load_unmerged: Callable[[], tuple[SparseCutForConditionalGeneration, SparseCutProcessor]] | None = None


FULL_PRECISIONS = ("fp32", "bf16")


def full_precision(device: torch.device) -> tuple[str, torch.dtype]:
    return ("bf16", torch.bfloat16) if device.type == "cuda" else ("fp32", torch.float32)


def build_default_shape(dtype: torch.dtype, device: torch.device):
    """The planned default model's shape: random SigLIP-style encoder and fusion, the real SmolLM2-135M."""
    from transformers import SiglipVisionConfig

    torch.manual_seed(0)
    model, processor = build(
        vision=SiglipVisionConfig(**DEFAULT_VISION), llm="smollm2-135m", dtype=dtype, **DEFAULT_SPARSECUT
    )
    return model.to(device).eval(), processor


def build_quick_shape(dtype: torch.dtype, device: torch.device):
    """A tiny SmolLM2-free model for CI. Widths are 64, the smallest bitsandbytes' CPU kernels accept."""
    torch.manual_seed(0)
    model, processor = build(
        vision=tiny_vision_config("siglip", hidden_size=64, intermediate_size=128),
        llm=tiny_text_config("llama", hidden_size=64, intermediate_size=128),
        tokenizer=byte_tokenizer(),
        dtype=dtype,
        fusion="cross_attention",
        high_res_grid=2,
        fusion_num_heads=4,
        shortcut_gate_init=0.5,
    )
    return model.to(device).eval(), processor


def build_seven_b_shape(dtype: torch.dtype, device: torch.device):
    """LLaVA-1.5-7B-class shapes with random weights, initialised directly on the device (CUDA only)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):  # 7B parameters would take minutes to initialise on the CPU
        model, processor = build(
            vision=CLIPVisionConfig(**SEVEN_B_VISION),
            llm=LlamaConfig(**SEVEN_B_LLM),
            tokenizer=byte_tokenizer(),
            dtype=dtype,
            **SEVEN_B_SPARSECUT,
        )
    return model.to(device).eval(), processor


def save_for_quantized_loading(model, processor, directory: str) -> str:
    """Save a built model so that `load_model(..., quantization=...)` can load it. A GGUF-derived LLM config
    keeps a GGUF `quantization_config` that would clash with bitsandbytes' config: drop it from the saved file."""
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    config_file = Path(directory) / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("quantization_config", None)
    config.get("text_config", {}).pop("quantization_config", None)
    config_file.write_text(json.dumps(config, indent=2))
    return directory


# --- one measurement ----------------------------------------------------------------------------------------
def request(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8))
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": PROMPT}]}]


def generation_config(model, settings: Settings, compile: bool = False) -> GenerationConfig:
    """Greedy, exactly `new_tokens` tokens: min_new_tokens masks EOS so every variant decodes the same length.

    With `compile`, a static KV cache lets `generate` run its decode steps through torch.compile (on
    CUDA "reduce-overhead": CUDA graphs; on the CPU inductor's default mode, which transformers applies there only
    when forced); the prefill stays eager.
    """
    source = model.generation_config
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=settings.new_tokens,
        min_new_tokens=settings.new_tokens,
        eos_token_id=source.eos_token_id,
        pad_token_id=source.pad_token_id if source.pad_token_id is not None else source.eos_token_id,
        bos_token_id=source.bos_token_id,
        use_cache=True,
    )
    if compile:
        from transformers import CompileConfig

        if model.device.type == "cuda":
            compile_config = CompileConfig(fullgraph=False, mode="reduce-overhead")  # CUDA graphs
        else:  # transformers compiles off CUDA only when told to; inductor's C++ kernels, no CUDA graphs
            compile_config = CompileConfig(fullgraph=False, mode="default")
            compile_config._compile_all_devices = True
        config.cache_implementation, config.compile_config = "static", compile_config
    return config


def measure(variant: Variant, messages: list[dict], settings: Settings, device: torch.device) -> Run:
    """One request end to end: processor -> generate, with the stage boundaries taken from forward hooks."""
    clock = make_clock(device)
    model = variant.model
    first_token = FirstToken(clock)
    config = generation_config(model, settings, compile=variant.compile)
    recorder = model.record_stats() if variant.stats else contextlib.nullcontext()
    stages = StageTimer(variant.stage_modules(), clock)
    with variant.active(), stages, PeakMemory(device) as memory, recorder as recorded:
        start, cpu_start = clock(), time.process_time()
        inputs = variant.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        ).to(device)
        preprocessed = clock()
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                generation_config=config,
                logits_processor=LogitsProcessorList([first_token]),
            )
        end, cpu_end = clock(), time.process_time()
        peak = memory.peak_bytes() / 2**20
    prompt = inputs["input_ids"].shape[1]
    generated = output.shape[1] - prompt
    if generated != settings.new_tokens:
        raise RuntimeError(f"{variant.name}: generated {generated} tokens instead of {settings.new_tokens}.")
    if variant.stats and (recorded is None or recorded.last is None):
        raise RuntimeError(f"{variant.name}: no shortcut statistics were recorded.")
    times = stages.times
    if len(times) != 4 or first_token.time is None:
        raise RuntimeError(f"{variant.name}: the vision encoder / fusion / first token were not all timed.")
    ms = 1000.0
    preprocess = (preprocessed - start) * ms
    vision = (times["vision_end"] - times["vision_start"]) * ms
    fusion = (times["fusion_end"] - times["fusion_start"]) * ms
    prefill = (first_token.time - times["fusion_end"]) * ms
    ttft = (first_token.time - start) * ms
    on_cpu = device.type == "cpu"  # on CUDA the host's CPU time says nothing about the GPU's work
    return Run(
        preprocess_ms=preprocess,
        vision_ms=vision,
        fusion_ms=fusion,
        prefill_ms=prefill,
        other_ms=ttft - preprocess - vision - fusion - prefill,
        ttft_ms=ttft,
        decode_tokens_per_s=(generated - 1) / max(end - first_token.time, 1e-9),
        peak_memory_mb=peak,
        llm_input_tokens=prompt,
        new_tokens=generated,
        ttft_cpu_ms=(first_token.cpu_time - cpu_start) * ms if on_cpu else None,
        decode_cpu_tokens_per_s=(generated - 1) / max(cpu_end - first_token.cpu_time, 1e-9) if on_cpu else None,
    )


def measure_group(
    variants: list[Variant], settings: Settings, device: torch.device, progress: tqdm
) -> dict[str, list[Run]]:
    """Round-robin over the variants, rotating the order every round; the warm-up rounds are not recorded."""
    messages = request()
    runs: dict[str, list[Run]] = {variant.name: [] for variant in variants}
    for round_index in range(settings.warmup + settings.runs):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            progress.set_postfix_str(f"{variant.name} ({'warm-up' if round_index < settings.warmup else 'run'})")
            run = measure(variant, messages, settings, device)
            if round_index >= settings.warmup:
                runs[variant.name].append(run)
            progress.update()
    return runs


# --- derived numbers ----------------------------------------------------------------------------------------
def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a weight occupies, with bitsandbytes' scales: 4-bit absmax per block (+ nested state), 8-bit SCB."""
    total = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)
    scales = [getattr(state, "absmax", None), getattr(getattr(state, "state2", None), "absmax", None)]
    scales.append(getattr(tensor, "SCB", None))
    return total + sum(x.numel() * x.element_size() for x in scales if isinstance(x, torch.Tensor))


def model_weight_bytes(model: nn.Module) -> int:
    """All parameters and buffers (shared ones once)."""
    return sum(stored_bytes(t) for t in [*model.parameters(), *model.buffers()])


def llm_weight_bytes_per_token(model: SparseCutForConditionalGeneration) -> int:
    """Bytes of LLM weights one decode step reads: every decoder weight and the LM head; the input embedding
    only when it is the (tied) head, since a lookup reads one row."""
    llm = model.language_model
    embedding = llm.get_input_embeddings().weight
    head = llm.get_output_embeddings().weight
    # parameters() lists a tied (shared) weight once
    return sum(stored_bytes(p) for p in llm.parameters() if p is not embedding or embedding is head)


def hbm_bandwidth_gbs(device: torch.device) -> tuple[float | None, str | None]:
    """Peak memory bandwidth of a CUDA device: 2 (double data rate) x memory clock x bus width, or a datasheet
    value by name."""
    if device.type != "cuda":
        return None, None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "device properties: 2 x memory clock x bus width"
    for name, bandwidth in HBM_BANDWIDTH_GBS.items():
        if name in props.name:
            return float(bandwidth), f"datasheet value for {name}"
    return None, None


def summarise(group: Group, variant: Variant, runs: list[Run], sizes: tuple[int, int], bandwidth_gbs) -> VariantResult:
    """sizes: (bytes of the group's model, LLM weight bytes per decode step)."""
    decode = Stat.of([r.decode_tokens_per_s for r in runs], higher_is_better=True)
    weights, per_token = sizes
    bound = bandwidth_gbs * 1e9 / per_token if bandwidth_gbs else None
    return VariantResult(
        shape=group.shape,
        precision=group.precision,
        variant=variant.name,
        description=variant.description,
        image_tokens=variant.image_tokens(),
        llm_input_tokens=runs[0].llm_input_tokens,
        new_tokens=runs[0].new_tokens,
        preprocess_ms=Stat.of([r.preprocess_ms for r in runs]),
        vision_ms=Stat.of([r.vision_ms for r in runs]),
        fusion_ms=Stat.of([r.fusion_ms for r in runs]),
        prefill_ms=Stat.of([r.prefill_ms for r in runs]),
        other_ms=Stat.of([r.other_ms for r in runs]),
        ttft_ms=Stat.of([r.ttft_ms for r in runs]),
        decode_tokens_per_s=decode,
        peak_memory_mb=Stat.of([r.peak_memory_mb for r in runs]),
        weights_mb=weights / 2**20,
        llm_weight_bytes_per_token=per_token,
        bandwidth_bound_tokens_per_s=bound,
        bandwidth_fraction=decode.median / bound if bound else None,
        ttft_cpu_ms=Stat.of([r.ttft_cpu_ms for r in runs]) if runs[0].ttft_cpu_ms is not None else None,
        decode_cpu_tokens_per_s=(
            Stat.of([r.decode_cpu_tokens_per_s for r in runs], higher_is_better=True)
            if runs[0].decode_cpu_tokens_per_s is not None
            else None
        ),
    )


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of the per-round ratios: the two runs of a round saw the same background load."""
    return float(np.median([a / b for a, b in zip(numerator, denominator)]))


# (name, numerator variant, denominator variant, wall-clock metric, CPU-time metric, threshold, comparison,
# offset): value = ratio - offset
RATIO_TARGETS = [
    ("TTFT sparsecut / llava", "sparsecut", "llava", "ttft_ms", "ttft_cpu_ms", 1.25, "<=", 0.0),
    (
        "decode tok/s sparsecut / llava",
        "sparsecut",
        "llava",
        "decode_tokens_per_s",
        "decode_cpu_tokens_per_s",
        0.97,
        ">=",
        0.0,
    ),
    (f"TTFT sparsecut / {PEER}", "sparsecut", PEER, "ttft_ms", "ttft_cpu_ms", 1.15, "<=", 0.0),
    (
        f"decode tok/s sparsecut / {PEER}",
        "sparsecut",
        PEER,
        "decode_tokens_per_s",
        "decode_cpu_tokens_per_s",
        0.99,
        ">=",
        0.0,
    ),
    (
        f"decode tok/s sparsecut+compile / {PEER}+compile",
        "sparsecut+compile",
        f"{PEER}+compile",
        "decode_tokens_per_s",
        "decode_cpu_tokens_per_s",
        0.99,
        ">=",
        0.0,
    ),
    (
        "decode tok/s sparsecut / sparsecut-unmerged (the merge's gain)",
        "sparsecut",
        UNMERGED,
        "decode_tokens_per_s",
        "decode_cpu_tokens_per_s",
        1.0,
        ">=",
        0.0,
    ),
    (
        "decode tok/s sparsecut+compile / sparsecut (the compiled loop's gain)",
        "sparsecut+compile",
        "sparsecut",
        "decode_tokens_per_s",
        "decode_cpu_tokens_per_s",
        1.0,
        ">=",
        0.0,
    ),
    ("TTFT appended / sparsecut", "appended", "sparsecut", "ttft_ms", "ttft_cpu_ms", 2.0, ">=", 0.0),
    ("TTFT overhead of the demo statistics", "sparsecut+stats", "sparsecut", "ttft_ms", "ttft_cpu_ms", 0.10, "<=", 1.0),
]
BANDWIDTH_TARGET = 0.5  # batch-1 decode: at least half the memory-bandwidth bound


def passes(value: float, threshold: float, comparison: str) -> bool:
    return value <= threshold if comparison == "<=" else value >= threshold


def targets_for(results: list[VariantResult], primary_precisions: set[str]) -> list[Target]:
    """Every ratio target for every (shape, precision) group; the full-precision groups are the primary ones.
    Pass/fail is decided on wall-clock time; on the CPU the CPU-time ratio is given alongside."""
    by_group: dict[tuple[str, str], dict[str, VariantResult]] = {}
    for result in results:
        by_group.setdefault((result.shape, result.precision), {})[result.variant] = result
    targets = []
    for (shape, precision), group in by_group.items():
        primary = precision in primary_precisions
        for name, top, bottom, metric, cpu_metric, threshold, comparison, offset in RATIO_TARGETS:
            if top not in group or bottom not in group:
                continue
            a, b = getattr(group[top], metric), getattr(group[bottom], metric)
            value = paired_ratio(a.runs, b.runs) - offset
            target = Target(name, shape, precision, value, threshold, comparison, passes(value, threshold, comparison))
            target.primary, target.ratio_of_medians = primary, a.median / b.median - offset
            cpu_a, cpu_b = getattr(group[top], cpu_metric), getattr(group[bottom], cpu_metric)
            if cpu_a is not None and cpu_b is not None:
                target.cpu_time_value = paired_ratio(cpu_a.runs, cpu_b.runs) - offset
                target.cpu_time_passed = passes(target.cpu_time_value, threshold, comparison)
            targets.append(target)
        for variant in ("sparsecut", "sparsecut+compile"):
            fraction = group[variant].bandwidth_fraction if variant in group else None
            if fraction is None:
                continue
            name = f"{'7B ' if shape == '7b' else ''}decode {variant} / bandwidth bound"
            ok = passes(fraction, BANDWIDTH_TARGET, ">=")
            target = Target(name, shape, precision, fraction, BANDWIDTH_TARGET, ">=", ok)
            target.primary = primary
            targets.append(target)
    return targets


# --- machine and report -------------------------------------------------------------------------------------
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def load_average() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def memory_read_bandwidth(mebibytes: int = 512, repeats: int = 10) -> tuple[float, str]:
    """(GB/s, how) main-memory read bandwidth on the CPU with torch's current threads: the fastest of `repeats`
    sums over a float32 tensor far larger than the caches (as large as the default model's LLM). A batch-1 decode
    step reads every LLM weight once, so this over the bytes per token bounds its tokens per second."""
    values = torch.ones(mebibytes * 2**20 // 4)
    values.sum()  # first touch
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        values.sum()
        best = min(best, time.perf_counter() - start)
    how = f"measured: fastest of {repeats} sums over {mebibytes} MiB of float32, {torch.get_num_threads()} thread(s)"
    return values.numel() * 4 / best / 1e9, how


def describe_machine(device: torch.device) -> Machine:
    gpu = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    bandwidth, source = hbm_bandwidth_gbs(device)
    read_bandwidth, read_source = memory_read_bandwidth() if device.type == "cpu" else (None, None)
    return Machine(
        device=str(device),
        cpu_model=cpu_model(),
        cpu_logical_cores=psutil.cpu_count(logical=True),
        cpu_physical_cores=psutil.cpu_count(logical=False),
        torch_threads=torch.get_num_threads(),
        memory_gb=round(psutil.virtual_memory().total / 2**30, 1),
        gpu_name=gpu.name if gpu else None,
        gpu_memory_gb=round(gpu.total_memory / 2**30, 1) if gpu else None,
        gpu_capability=f"{gpu.major}.{gpu.minor}" if gpu else None,
        gpu_bandwidth_gbs=bandwidth,
        gpu_bandwidth_source=source,
        platform=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=version("transformers") or "?",
        bitsandbytes=version("bitsandbytes"),
        cuda=torch.version.cuda,
        sparsecut_commit=git_commit(),
        load_average_before=load_average(),
        memory_read_bandwidth_gbs=read_bandwidth,
        memory_bandwidth_source=read_source,
    )


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def command_line(
    model: str | None, quick: bool, device: str, quantization: str | None, compile: bool, threads: int | None
) -> str:
    parts = ["python -m sparsecut.cli bench", f"--device {device}"]
    if model:
        parts.append(f"--model {model}")
    if quick:
        parts.append("--quick")
    if quantization:
        parts.append(f"--quantization {quantization}")
    if compile:
        parts.append("--compile")
    if threads:
        parts.append(f"--threads {threads}")
    return " ".join(parts)


def bound_lines(report: Report) -> list[str]:
    """The memory-bandwidth bound of batch-1 decoding, per group: bandwidth / LLM weight bytes per token."""
    m = report.machine
    bandwidth = m.gpu_bandwidth_gbs or m.memory_read_bandwidth_gbs
    if not bandwidth:
        return []
    source = m.gpu_bandwidth_source or m.memory_bandwidth_source
    lines = [f"- memory bandwidth: {bandwidth:.1f} GB/s ({source})"]
    for r in report.results:
        if r.variant == "sparsecut" and r.bandwidth_bound_tokens_per_s:
            lines.append(
                f"- decode bound, {r.shape} {r.precision}: {bandwidth:.1f} GB/s / "
                f"{r.llm_weight_bytes_per_token / 1e6:.0f} MB of LLM weights read per token = "
                f"{r.bandwidth_bound_tokens_per_s:.1f} tok/s"
            )
    return lines


def fmt(stat: Stat, digits: int = 1) -> str:
    return f"{stat.median:.{digits}f} / {stat.p90:.{digits}f}"


def markdown(report: Report) -> str:
    m = report.machine
    gpu = f"{m.gpu_name} ({m.gpu_memory_gb} GiB, sm {m.gpu_capability})" if m.gpu_name else "none"
    lines = [
        f"# sparsecut bench: {m.device}",
        "",
        f"- command: `{report.command}`",
        f"- model: {report.model}",
        f"- machine: {m.cpu_model}, {m.cpu_logical_cores} logical cores, torch threads {m.torch_threads}, "
        f"{m.memory_gb} GiB RAM; GPU: {gpu}",
        f"- versions: torch {m.torch}, transformers {m.transformers}, bitsandbytes {m.bitsandbytes}, "
        f"python {m.python}, CUDA {m.cuda}; sparsecut {m.sparsecut_commit}",
        f"- load average before / after: {m.load_average_before} / {m.load_average_after}",
        *bound_lines(report),
        f"- {report.settings.runs} runs after {report.settings.warmup} warm-up round(s), batch 1, greedy, "
        f"{report.settings.new_tokens} new tokens; `median / p90` (for tok/s the p90 column is the slow tail); "
        f"{report.created}, {report.duration_s:.0f} s",
    ]
    cpu_time = any(r.ttft_cpu_ms is not None for r in report.results)
    header = ["shape", "precision", "variant", "LLM input tokens (image)", "preprocess ms", "vision ms", "fusion ms"]
    header += ["prefill ms", "TTFT ms", "decode tok/s", "weights MiB", "peak MiB"]
    if cpu_time:
        header += ["TTFT CPU-time ms", "decode tok/s by CPU time"]
    rows = []
    for r in report.results:
        decode = fmt(r.decode_tokens_per_s)
        if r.bandwidth_fraction is not None:
            decode += f" ({100 * r.bandwidth_fraction:.0f}% of bound)"
        row = [r.shape, r.precision, r.variant, f"{r.llm_input_tokens} ({r.image_tokens})", fmt(r.preprocess_ms)]
        row += [fmt(r.vision_ms), fmt(r.fusion_ms), fmt(r.prefill_ms), fmt(r.ttft_ms), decode]
        row += [f"{r.weights_mb:.0f}", f"{r.peak_memory_mb.median:.0f}"]
        if cpu_time:
            row += [fmt(r.ttft_cpu_ms), fmt(r.decode_cpu_tokens_per_s)]
        rows.append(row)
    lines += ["", markdown_table(header, rows)]
    header = ["target", "shape", "precision", "threshold", "wall clock (median of per-round ratios)"]
    header += ["ratio of medians", "result", "CPU time (median of per-round ratios)", "result by CPU time"]
    rows = []
    for t in report.targets:
        name = t.name if t.primary else f"{t.name} (reported only)"
        medians = "" if t.ratio_of_medians is None else f"{t.ratio_of_medians:.3f}"
        cpu_value = "" if t.cpu_time_value is None else f"{t.cpu_time_value:.3f}"
        cpu_result = "" if t.cpu_time_passed is None else ("pass" if t.cpu_time_passed else "FAIL")
        result = "pass" if t.passed else "FAIL"
        rows.append([name, t.shape, t.precision, f"{t.comparison} {t.threshold}", f"{t.value:.3f}", medians, result])
        rows[-1] += [cpu_value, cpu_result]
    lines += ["", markdown_table(header, rows)]
    lines += ["", *[f"- {note}" for note in report.notes], ""]
    return "\n".join(lines)


# --- entry point --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence per-call library chatter that would flood the progress bar (bitsandbytes' int8 cast notice)."""
    bnb_logger = logging.getLogger("bitsandbytes")
    level = bnb_logger.level
    bnb_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*inputs will be cast.*")
            yield
    finally:
        bnb_logger.setLevel(level)


def shown_path(path: str) -> str:
    """`path` as the report shows it: relative to the checkout when inside it (results name no local folders)."""
    checkout = Path(__file__).resolve().parent.parent
    resolved = Path(path).resolve()
    return str(resolved.relative_to(checkout)) if resolved.is_relative_to(checkout) else str(path)


def plan_groups(
    model: str | None, quick: bool, device: torch.device, quantization: str | None, workdir: str
) -> tuple[str, list[Group], list[str]]:
    """(model label, groups to measure in order, notes). Loaders are lazy: one group's weights at a time."""
    notes = []
    full_name, dtype = full_precision(device)
    if quantization in (None, "none"):
        precisions = [full_name] if quantization == "none" else [full_name, *QUANTIZED]
    else:
        precisions = [quantization]
    if version("bitsandbytes") is None and any(p in QUANTIZED for p in precisions):
        notes.append("bitsandbytes is not installed: 8-bit / 4-bit variants skipped.")
        precisions = [p for p in precisions if p not in QUANTIZED]

    path = model or (str(DEFAULT_WEIGHTS) if is_checkpoint(DEFAULT_WEIGHTS) else None)
    if path is not None:
        label, shape = f"checkpoint {shown_path(path)}", "checkpoint"

        def loader(precision: str):
            quant = precision if precision in QUANTIZED else None
            return lambda: load_model(path, quantization=quant, device=str(device), dtype=None if quant else dtype)

        def load_unmerged():
            return load_model(path, device=str(device), dtype=dtype, merge_adapters=False)

        has_adapters = bool(SparseCutConfig.from_pretrained(path).lora)
        groups = [
            Group(shape, p, loader(p), load_unmerged if has_adapters and p == full_name else None) for p in precisions
        ]
        return label, groups, notes

    if quick:
        label = "quick: tiny random model (SigLIP 2 x 64 + Llama 4 x 64), no SmolLM2"
        shape, builder = "quick", build_quick_shape
    else:
        label = (
            "default shape (weights/ not trained yet): random SigLIP-style encoder (6 x 256, 64 px / 8 px patches) "
            "and cross-attention fusion + the real SmolLM2-135M-Instruct, grid 2, schedule uniform:4"
        )
        shape, builder = "default", build_default_shape
    saved: dict[str, str] = {}

    def build_full():
        built = builder(dtype, device)
        if any(p in QUANTIZED for p in precisions):  # saved once, reloaded quantized by the later groups
            saved["dir"] = save_for_quantized_loading(*built, os.path.join(workdir, shape))
        return built

    def load_quantized(precision: str):
        def load():
            if "dir" not in saved:  # --quantization 8bit/4bit only: build and save first
                build_full()
                release_memory()
            return load_model(saved["dir"], quantization=precision, device=str(device))

        return load

    groups = [Group(shape, p, build_full if p == full_name else load_quantized(p)) for p in precisions]
    if device.type == "cuda" and not quick:
        seven_b = os.path.join(workdir, "7b")

        def build_seven_b():
            built = build_seven_b_shape(torch.bfloat16, device)
            if "4bit" in precisions:
                save_for_quantized_loading(*built, seven_b)
            return built

        if "bf16" in precisions:
            groups.append(Group("7b", "bf16", build_seven_b))
        if "4bit" in precisions:

            def load_seven_b_nf4():
                if not os.path.isdir(seven_b):
                    build_seven_b()
                    release_memory()
                return load_model(seven_b, quantization="4bit", device=str(device))

            groups.append(Group("7b", "4bit", load_seven_b_nf4))
    return label, groups, notes


def bench(
    model: str | None = None,
    quick: bool = False,
    device: str = "cpu",
    quantization: str | None = None,
    out_dir: str = "benchmarks/results",
    compile: bool = False,
    threads: int | None = None,
) -> dict:
    """Run the benchmark, write `<out_dir>/<device>-<cpu or gpu model>[-...].json` and `.md`, return the report.

    model: a saved SparseCut checkpoint; default `weights/`, or, while it does not exist, the default shape with
    random encoder/fusion weights (the quick mode uses a tiny SmolLM2-free model instead). quick: 1 warm-up +
    3 runs of 8 new tokens, for CI. device: "cpu" or "cuda". quantization: None measures the full precision
    and, where bitsandbytes is available, 8-bit and 4-bit; "none", "8bit" or "4bit" measure only that one.
    compile: CUDA only, static KV cache + torch.compile for the decode steps. threads: torch CPU threads for
    the run (default: torch's choice); on a machine shared with other jobs `threads=1` avoids OpenMP threads
    waiting for each other at every barrier while one of them is descheduled, which otherwise inflates and
    scatters the times several-fold. The quick mode uses 1 thread unless told otherwise.
    """
    if quantization not in (None, "none", *QUANTIZED):
        raise ValueError(f"quantization must be one of none, 8bit, 4bit; got {quantization!r}.")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but CUDA is not available on this machine.")
    target = torch.device(device)
    settings = QUICK if quick else FULL
    settings = Settings(settings.warmup, settings.runs, settings.new_tokens, compile=compile)
    command = command_line(model, quick, device, quantization, compile, threads)  # as given, before defaults
    default_threads = torch.get_num_threads()
    if quick and threads is None:
        threads = 1  # the tiny model's ops gain nothing from threads, and on a busy machine they wait on each other
    if threads:
        torch.set_num_threads(threads)
    try:
        report = Report(
            command=command,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            model="",
            settings=settings,
            machine=describe_machine(target),
        )
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="sparsecut-bench-") as workdir, quiet():
            report.model, groups, report.notes = plan_groups(model, quick, target, quantization, workdir)
            run_groups(report, groups, target)
        report.duration_s = time.perf_counter() - started
    finally:
        torch.set_num_threads(default_threads)
    report.targets = targets_for(report.results, {full_precision(target)[0]})
    report.machine.load_average_after = load_average()
    report.notes += standard_notes(target, quick, compile, report.model) + load_notes(report.machine)
    data = write(report, out_dir, quick, quantization, compile)
    print(markdown(report))
    print(f"written: {data['files']['json']}, {data['files']['markdown']}")
    return data


def run_groups(report: Report, groups: list[Group], device: torch.device) -> None:
    """Measure the groups one after the other, each loaded only for its own measurements."""
    settings = report.settings
    bandwidth = report.machine.gpu_bandwidth_gbs or report.machine.memory_read_bandwidth_gbs
    rounds = settings.warmup + settings.runs
    with tqdm(total=0, desc="sparsecut bench", unit="run", file=sys.stderr) as progress:
        for group in groups:
            progress.set_description(f"{group.shape} {group.precision}")
            base, processor = group.load()
            full = group.precision in FULL_PRECISIONS
            variants = make_variants(base, processor, peer=full, compile=settings.compile and full)
            sizes = {v.name: (model_weight_bytes(base), llm_weight_bytes_per_token(base)) for v in variants}
            if group.load_unmerged is not None:
                unmerged, unmerged_processor = group.load_unmerged()
                description = "SparseCut with its LoRA adapters unmerged (peft layers, as trained; own copy)"
                variants.insert(1, Variant(UNMERGED, description, unmerged, unmerged_processor))
                sizes[UNMERGED] = model_weight_bytes(unmerged), llm_weight_bytes_per_token(unmerged)
            progress.total += len(variants) * rounds
            runs = measure_group(variants, settings, device, progress)
            report.results += [summarise(group, v, runs[v.name], sizes[v.name], bandwidth) for v in variants]
            del base, processor, variants
            release_memory()


def standard_notes(device: torch.device, quick: bool, compile: bool, model: str) -> list[str]:
    notes = [
        "Targets are ratios within this run: variants of a group run round-robin (rotated order each round) and "
        "each ratio is the median of the per-round ratios; absolute times depend on the machine's load.",
        "TTFT = preprocess + vision + fusion + prefill + other (generate set-up); prefill runs from the end of the "
        "fusion to the first token's logits (embedding merge, LLM forward with shortcut hooks, LM head).",
        "All variants of a group share one set of weights: llava and appended are config variants of the same "
        "class wrapped around the base model's encoder, projector and LLM modules (no copy); the base model's "
        "shortcut hooks are detached while they run. transformers-llava is transformers' LlavaForConditionalGeneration "
        "holding the same tensors under LLaVA's names; for a concat_mlp fusion its projector (like llava's) is the "
        "fusion projector's low-res columns, a timing stand-in. sparsecut-unmerged (a checkpoint with LoRA "
        "adapters) is a second copy loaded with merge_adapters=False.",
        "Decode bound = memory bandwidth / LLM weight bytes read per decode step (every decoder weight and the LM "
        "head; the input embedding reads one row); `% of bound` is the median decode speed against it.",
    ]
    if device.type == "cpu":
        notes.append(
            "CPU run: peak memory is the process RSS high-water mark, so it includes the interpreter, the libraries "
            "and every loaded weight (shared by the variants of a group), and it cannot fall below what earlier "
            "groups left in the heap; `weights MiB` is the group's model alone (for a merged model with "
            "lora_needs_image, the base weights kept for text-only answers included). The CUDA paths (bf16, "
            "synchronised timing, max_memory_allocated, the 7B-class shape, CUDA graphs) were not measured here."
        )
    else:
        notes.append(
            "CUDA: times are taken after torch.cuda.synchronize(); peak memory is max_memory_allocated. Decode may "
            "run one step ahead of the host (transformers' deferred stop check), which costs at most one extra step "
            "per run."
        )
    if compile:
        mode = "reduce-overhead, CUDA graphs" if device.type == "cuda" else "inductor's default mode"
        notes.append(
            f"--compile: the +compile variants decode with a static KV cache through torch.compile ({mode}); their "
            "prefill is eager; compilation happens in the warm-up round."
        )
    if quick:
        notes.append(
            f"--quick measured {model} with {QUICK.runs} runs of {QUICK.new_tokens} new tokens: a smoke test of "
            "the benchmark, not a measurement."
        )
    return notes


def load_notes(machine: Machine) -> list[str]:
    """Say so when other processes were running: the load average before the run counts only them."""
    before, cores = machine.load_average_before, machine.cpu_logical_cores
    if not before or not cores or before[0] < 0.5 * cores:
        return []
    return [
        f"The machine was shared: load average {before} before the run and {machine.load_average_after} after it "
        f"on {cores} logical cores, so other processes competed for the CPU; absolute times are inflated and noisy, "
        "the interleaved ratios much less so."
    ]


def write(report: Report, out_dir: str, quick: bool, quantization: str | None, compile: bool) -> dict:
    m = report.machine
    name = f"{m.device.split(':')[0]}-{slug(m.gpu_name or m.cpu_model)}"
    name += f"-{quantization}" if quantization else ""
    name += "-compile" if compile else ""
    name += "-quick" if quick else ""
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    data = asdict(report)
    json_path, md_path = directory / f"{name}.json", directory / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md_path.write_text(markdown(report))
    data["files"] = {"json": str(json_path), "markdown": str(md_path)}
    return data
