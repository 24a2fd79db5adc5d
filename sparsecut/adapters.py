"""LoRA adapters on the LLM (stage 2 "instruction tuning" through peft) and checkpoints without the base LLM.

A SparseCut model trained from a public LLM only needs to ship what is not that LLM: the vision encoder, the
fusion, the shortcut gates and the LoRA adapter. `save_without_base` writes such a checkpoint with
`config.base_llm` naming where the base weights come from; `sparsecut.load_model` rebuilds the LLM from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

LORA_DEFAULTS = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def inject_lora(llm: nn.Module, lora: dict) -> None:
    """Insert LoRA adapters into the LLM's linear layers in place (decoder layers stay the same objects, so
    the shortcut hooks stay attached)."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(**{**LORA_DEFAULTS, **lora}), llm)


def is_base_llm_weight(name: str) -> bool:
    """A state-dict key that belongs to the base LLM (not its LoRA adapter)."""
    return name.startswith("language_model.") and "lora_" not in name


def merge_lora(model, keep_base: bool = False) -> None:
    """Fold the LoRA adapters into the LLM's weights and remove them, so that every adapted projection is one
    plain `nn.Linear` again (for inference, quantized loading or export).

    An unmerged adapter costs little arithmetic but two extra matrix products and a module call per projection
    per token, which on the CPU cost more than the arithmetic (benchmarks/results/changes.md). `keep_base=True`
    (for `config.lora_needs_image`) keeps each projection's base weight beside the merged one as a
    non-persistent buffer, so that `switch_merged_adapters` can swap them for a text-only conversation: the base
    LLM's exact weights, at the cost of a second copy of the adapted weights. A merged model is for inference:
    it saves the weights in use, with no adapters (train from `load_model(..., merge_adapters=False)`).
    """
    from peft.tuners.lora import LoraLayer

    llm = model.language_model
    for name, module in list(llm.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        weight = base.weight
        delta = sum(module.get_delta_weight(adapter).float() for adapter in module.active_adapters)
        merged = (weight.detach().float() + delta).to(weight.dtype)
        if keep_base:
            base.register_buffer(INACTIVE_WEIGHT, weight.detach().clone(), persistent=False)
        with torch.no_grad():
            weight.copy_(merged)
        parent_name, _, child = name.rpartition(".")
        setattr(llm.get_submodule(parent_name) if parent_name else llm, child, base)
    model.config.lora = None
    model._merged_adapters = MergedAdapters(keep_base)


INACTIVE_WEIGHT = "inactive_weight"  # the buffer that holds the weight a merged projection does not use now


@dataclass
class MergedAdapters:
    """What `merge_lora` left on a model: whether each merged projection keeps its base weight, and which of
    the two is in use."""

    keep_base: bool
    on: bool = True  # the merged weights are in use


def switch_merged_adapters(model, on: bool) -> None:
    """Use the merged weights (`on`) or the base LLM's (off) in every projection `merge_lora(keep_base=True)`
    merged: swaps each weight's storage with its `inactive_weight` buffer, so no weight is copied."""
    state = model._merged_adapters
    if state is None or not state.keep_base:
        raise ValueError("The adapters were merged without keeping the base weights; they cannot be switched off.")
    if on == state.on:
        return
    for module in model.language_model.modules():
        inactive = module._buffers.get(INACTIVE_WEIGHT)
        if inactive is not None:
            active = module.weight.data
            module.weight.data = inactive
            module._buffers[INACTIVE_WEIGHT] = active
    state.on = on


def save_without_base(model, processor, out_dir: str | Path, base_llm: str) -> Path:
    """Save everything but the base LLM's weights; `base_llm` (e.g. "smollm2-135m") is where they come from."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.base_llm = base_llm
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not is_base_llm_weight(k)}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    processor.save_pretrained(out)
    return out
