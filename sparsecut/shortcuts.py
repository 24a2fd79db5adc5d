"""Sparse shortcuts (method note, "Parts" 4): fused encoder features added into chosen LLM layers.

Before LLM layer l, the fused features of its paired encoder layer v are added to the hidden states at the
image-token positions, and nowhere else. The LLM's modeling code is never copied or edited: forward
pre-hooks on the decoder layers do the add, attached and detached explicitly. Each forward of the model
first calls `prepare` with that pass's image positions; a pass with no image tokens (a decode step, a text
prompt) leaves the hidden states untouched.

Each shortcut has a learned per-channel gate (initialised by `shortcut_gate_init`, 0 by default, so a fresh
model starts as its shortcut-free baseline) and a runtime scale (`shortcut_scales`, 0 switches it off).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .configuration import SparseCutConfig


class SparseShortcuts(nn.Module):
    def __init__(self, config: SparseCutConfig):
        super().__init__()
        self.vision_layers = [v % (config.vision_depth + 1) for v in config.shortcut_vision_layers]
        self.llm_layers = [layer % config.llm_depth for layer in config.shortcut_llm_layers]
        self.gate = nn.Parameter(
            torch.full((len(self.llm_layers), config.text_config.hidden_size), config.shortcut_gate_init)
        )
        self._handles: list[RemovableHandle] = []
        self._state: dict | None = None

    def attach(self, decoder_layers: nn.ModuleList) -> None:
        """Register one pre-hook per LLM layer that receives shortcuts."""
        self.detach()
        by_layer: dict[int, list[int]] = defaultdict(list)
        for index, layer in enumerate(self.llm_layers):
            by_layer[layer].append(index)
        for layer, indices in by_layer.items():
            hook = self._make_hook(indices)
            self._handles.append(decoder_layers[layer].register_forward_pre_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def prepare(
        self,
        image_mask: torch.Tensor | None,
        features: torch.Tensor | None,
        scales: torch.Tensor | None,
        stats: dict | None,
    ) -> None:
        """Set what the next LLM pass adds.

        image_mask: (B, T) bool, the image positions of this pass; features: (k, M, D) fused features in the
        order of those positions (M = image positions); scales: (k,) or None; stats: a dict that collects
        per-shortcut ‖added‖ / ‖hidden‖ at each image position, or None.
        The model clears the state after its pass (`clear`), except under gradient checkpointing, which
        replays the pass during backward; a pass of another shape never receives a stale state.
        """
        if features is None or image_mask is None or not bool(image_mask.any()) or not self.llm_layers:
            self._state = None
            return
        if scales is not None:
            scales = torch.as_tensor(scales, dtype=features.dtype, device=features.device)
            if scales.shape != (len(self.llm_layers),):
                raise ValueError(
                    f"shortcut_scales needs {len(self.llm_layers)} values (one per shortcut), "
                    f"got {tuple(scales.shape)}."
                )
        positions = image_mask.nonzero(as_tuple=True)  # row-major: sample by sample, in token order
        if positions[0].numel() != features.shape[1]:
            raise ValueError(f"{positions[0].numel()} image positions but {features.shape[1]} shortcut features.")
        self._state = {
            "shape": tuple(image_mask.shape),
            "positions": positions,
            "features": features,
            "scales": scales,
            "stats": stats,
        }

    def clear(self) -> None:
        self._state = None

    def _make_hook(self, indices: list[int]):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            state = self._state
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, D)
            if state is None or tuple(hidden.shape[:2]) != state["shape"]:
                return None
            positions = tuple(p.to(hidden.device) for p in state["positions"])
            at_images = hidden[positions]  # (M, D)
            total = None
            for index in indices:
                added = state["features"][index].to(hidden.device, hidden.dtype) * self.gate[index].to(hidden.dtype)
                if state["scales"] is not None:
                    added = added * state["scales"][index].to(hidden.dtype)
                if state["stats"] is not None:
                    ratio = added.float().norm(dim=-1) / at_images.float().norm(dim=-1).clamp_min(1e-12)
                    state["stats"][index] = ratio.detach()
                total = added if total is None else total + added
            hidden = hidden.index_put(positions, total, accumulate=True)  # out of place: autograd-safe
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook
