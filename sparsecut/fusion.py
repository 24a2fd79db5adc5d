"""Multi-grained fusion (method note, "Parts" 2): low-res + high-res tokens of one encoder layer -> LLM tokens.

One module, shared by every selected encoder layer (the layers are stacked on the batch axis and fused in one
call). Three modes:
- "cross_attention": the low-res tokens are queries, the grid**2 high-res crops' tokens are keys and values;
  multi-head attention + residual + LayerNorm, an FFN + LayerNorm, then the projector. Crops lose their place
  in the whole image, so queries and keys get a fixed 2-D sin-cos code of their position *in the whole image*
  (not in the paper; without it attention cannot tell the four crops apart or find a query's own area).
- "concat_mlp": each low-res token is concatenated with the grid x grid high-res tokens covering the same area
  ((1 + grid**2) x d features), then the projector.
- "none": low-res tokens only, through the projector (the LLaVA-1.5 connector).
The projector is LLaVA's 2-layer GELU MLP to the LLM hidden size, optionally followed by `ImageTokenNorm`
(`image_token_scale`: centred image tokens at the scale of the LLM's text embeddings).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .configuration import SparseCutConfig


def sincos_2d(rows: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position codes for points (rows, cols) in [0, 1]: (P,) x 2 -> (P, dim)."""
    quarter = dim // 4
    freqs = torch.exp(torch.arange(quarter, dtype=torch.float32) * (-math.log(1000.0) / max(quarter, 1)))
    angles_r, angles_c = rows[:, None] * freqs * math.pi * 8, cols[:, None] * freqs * math.pi * 8
    codes = torch.cat([angles_r.sin(), angles_r.cos(), angles_c.sin(), angles_c.cos()], dim=-1)
    return F.pad(codes, (0, dim - codes.shape[-1]))


@functools.lru_cache(maxsize=8)
def position_codes(side: int, grid: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes for the low-res tokens (side*side, dim) and the high-res crops' tokens (grid*grid*side*side, dim),
    both placed at the centre of the area they cover in the whole image."""
    low = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    low_r, low_c = torch.meshgrid(low, low, indexing="ij")
    crop = torch.arange(grid, dtype=torch.float32)
    patch = torch.arange(side, dtype=torch.float32)
    # high-res token (crop cy, cx; patch py, px) sits at ((cy*side + py + 0.5) / (grid*side), ...)
    coord = (crop[:, None] * side + patch[None, :] + 0.5) / (grid * side)  # (grid, side)
    high_r = coord[:, None, :, None].expand(grid, grid, side, side)
    high_c = coord[None, :, None, :].expand(grid, grid, side, side)
    return (
        sincos_2d(low_r.flatten(), low_c.flatten(), dim),
        sincos_2d(high_r.flatten(), high_c.flatten(), dim),
    )


@dataclass
class FusionOutput:
    """Fused tokens and, when asked for, what the demo shows of the fusion."""

    tokens: torch.Tensor  # (N, T, D) in LLM space
    attention: torch.Tensor | None = None  # cross_attention: (N, P, grid*grid*P), head-averaged
    contribution: torch.Tensor | None = None  # concat_mlp: (N, P, 1 + grid*grid), shares summing to 1


class ImageTokenNorm(nn.Module):
    """Centres the projected tokens of each image (removes their mean over the image's tokens) and rescales
    them so that their RMS over the image is `initial_scale` times a learned per-channel gain.

    Encoder features share a large constant component (measured on the default encoder: each token's cosine
    to the mean token is 0.70, after the projector 0.83), so raw image tokens all look alike to a frozen LLM and its
    attention cannot single one out. Centring keeps what differs between patches; one scale per image (not
    per token) keeps background tokens small next to object tokens.
    """

    def __init__(self, dim: int, initial_scale: float, eps: float = 1e-6):
        super().__init__()
        self.initial_scale, self.eps = initial_scale, eps
        self.weight = nn.Parameter(torch.full((dim,), float(initial_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, D): N images (or layer-image pairs)
        x = x - x.mean(dim=1, keepdim=True)
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=(1, 2), keepdim=True) + self.eps).to(x.dtype)
        return x * self.weight


def init_new_layers(module: nn.Module, std: float = 0.02) -> None:
    """Start newly made fusion layers as LLaVA's projector and most transformers models start theirs: linear
    weights ~ N(0, std) with zero biases, LayerNorms the identity. Done on construction: transformers 5 calls
    `_init_weights` only on the leaf modules that own parameters, where a Linear cannot tell that it is new."""
    for child in module.modules():
        if isinstance(child, nn.Linear):
            nn.init.normal_(child.weight, std=std)
            if child.bias is not None:
                nn.init.zeros_(child.bias)
        elif isinstance(child, nn.LayerNorm):
            nn.init.ones_(child.weight)
            nn.init.zeros_(child.bias)


class Projector(nn.Module):
    """LLaVA-1.5's connector: Linear -> GELU -> Linear into the LLM hidden size."""

    def __init__(self, in_dim: int, out_dim: int, act: str, output_scale: float | None = None, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)
        self.output_norm = ImageTokenNorm(out_dim, output_scale) if output_scale is not None else None
        init_new_layers(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_2(self.act(self.linear_1(x)))
        return x if self.output_norm is None else self.output_norm(x)


class CrossAttentionBlock(nn.Module):
    """Low-res queries attend to high-res keys/values; residual attention + FFN.

    Post-norm (the default): LayerNorm after each residual add. Pre-norm (`fusion_residual`): LayerNorm on the
    attention's and the FFN's inputs only, so the residual stream is the low-res tokens themselves, and with the
    output layers at zero (`zero_output_layers`, done on construction) the block is exactly the identity.
    """

    def __init__(self, config: SparseCutConfig):
        super().__init__()
        d = config.vision_config.hidden_size
        self.num_heads = config.fusion_num_heads
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.attn_norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(
            nn.Linear(d, d * config.fusion_ffn_ratio), nn.GELU(), nn.Linear(d * config.fusion_ffn_ratio, d)
        )
        self.ffn_norm = nn.LayerNorm(d)
        self.pre_norm = config.fusion_residual
        self.side, self.grid = config.patches_per_side, config.high_res_grid
        init_new_layers(self)
        if self.pre_norm:
            self.zero_output_layers()

    def zero_output_layers(self) -> None:
        """Zero o_proj and the FFN's second linear: a pre-norm block then returns its queries unchanged, while
        their gradients (attended values, FFN activations) are not zero, so the block starts training at once."""
        for layer in (self.o_proj, self.ffn[2]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self, low: torch.Tensor, high: torch.Tensor, need_weights: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        n, p, d = low.shape  # low: (N, P, d); high: (N, G*P, d)
        heads, head_dim = self.num_heads, d // self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:  # (N, S, d) -> (N, heads, S, head_dim)
            return x.view(n, -1, heads, head_dim).transpose(1, 2)

        residual = low
        if self.pre_norm:
            low, high = self.attn_norm(low), self.attn_norm(high)
        low_pos, high_pos = position_codes(self.side, self.grid, d)  # cached; constants, not weights
        q = split(self.q_proj(low + low_pos.to(low.device, low.dtype)))
        k = split(self.k_proj(high + high_pos.to(high.device, high.dtype)))
        v = split(self.v_proj(high))
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)  # (N, heads, P, G*P)
            probs = scores.float().softmax(dim=-1).to(q.dtype)
            attended = probs @ v
            weights = probs.mean(dim=1)  # (N, P, G*P)
        else:
            attended = F.scaled_dot_product_attention(q, k, v)
        attended = attended.transpose(1, 2).reshape(n, p, d)
        if self.pre_norm:
            x = residual + self.o_proj(attended)
            return x + self.ffn(self.ffn_norm(x)), weights
        x = self.attn_norm(residual + self.o_proj(attended))
        return self.ffn_norm(x + self.ffn(x)), weights


class MultiGrainedFusion(nn.Module):
    """Fuses the views of one or more encoder layers into LLM-space tokens, one fused token per low-res patch
    (or, in the appended-tokens baseline, one per patch of every view)."""

    def __init__(self, config: SparseCutConfig):
        super().__init__()
        self.mode = config.fusion
        self.append = config.append_high_res_tokens
        self.grid = config.high_res_grid
        self.side = config.patches_per_side
        d, out_dim = config.vision_config.hidden_size, config.text_config.hidden_size
        fuses_views = self.mode != "none"
        self.input_norm = nn.LayerNorm(d) if fuses_views and config.fusion_input_norm else nn.Identity()
        self.cross_attention = CrossAttentionBlock(config) if self.mode == "cross_attention" else None
        in_dim = d * (1 + self.grid**2) if self.mode == "concat_mlp" else d
        self.projector = Projector(
            in_dim, out_dim, config.projector_hidden_act, config.image_token_scale, bias=config.projector_bias
        )

    def neighbours(self, high: torch.Tensor) -> torch.Tensor:
        """For each low-res patch, the grid x grid high-res tokens covering its area.

        high: (N, G, P, d) crops, row-major -> (N, P, G, d), neighbours row-major within the area.
        """
        n, _, _, d = high.shape
        g, s = self.grid, self.side
        full = high.view(n, g, g, s, s, d).permute(0, 1, 3, 2, 4, 5).reshape(n, g * s, g * s, d)  # whole image grid
        areas = full.view(n, s, g, s, g, d).permute(0, 1, 3, 2, 4, 5)  # (N, s, s, g, g, d)
        return areas.reshape(n, s * s, g * g, d)

    def forward(self, views: torch.Tensor, output_stats: bool = False) -> FusionOutput:
        """views: (N, V, P, d) encoder tokens of N (layer, image) pairs; V = 1 + grid**2 views, or 1 if the
        mode reads the low-res view only."""
        if self.append:  # baseline: every view's tokens, projected independently
            return FusionOutput(self.projector(views.flatten(1, 2)))
        low = self.input_norm(views[:, 0])  # (N, P, d)
        if self.mode == "none":
            return FusionOutput(self.projector(low))
        high = self.input_norm(views[:, 1:])  # (N, G, P, d)
        if self.mode == "cross_attention":
            fused, weights = self.cross_attention(low, high.flatten(1, 2), need_weights=output_stats)
            return FusionOutput(self.projector(fused), attention=weights)
        features = torch.cat([low[:, :, None], self.neighbours(high)], dim=2)  # (N, P, 1 + G, d)
        tokens = self.projector(features.flatten(2))
        contribution = None
        if output_stats:
            # Share of the first projector layer's pre-activation norm that each neighbour contributes.
            # One neighbour at a time keeps the temporary at (N, P, D) instead of (N, P, 1 + G, D).
            w = self.projector.linear_1.weight.view(-1, features.shape[2], features.shape[3])  # (D, 1 + G, d)
            norms = torch.stack([(features[:, :, g] @ w[:, g].T).norm(dim=-1) for g in range(w.shape[1])], dim=-1)
            contribution = norms / norms.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return FusionOutput(tokens, contribution=contribution)
