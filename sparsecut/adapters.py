"""LoRA adapters on the LLM (stage 2 "instruction tuning" through peft) and checkpoints without the base LLM.

A SparseCut model trained from a public LLM only needs to ship what is not that LLM: the vision encoder, the
fusion, the shortcut gates and the LoRA adapter. `save_without_base` writes such a checkpoint with
`config.base_llm` naming where the base weights come from; `sparsecut.load_model` rebuilds the LLM from there.
"""

from __future__ import annotations

from pathlib import Path

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


def merge_lora(model) -> None:
    """Fold the LoRA adapters into the LLM's weights and remove them (for quantized loading or export)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.language_model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(
                model.language_model.get_submodule(parent_name) if parent_name else model.language_model,
                child,
                module.get_base_layer(),
            )
    model.config.lora = None


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
