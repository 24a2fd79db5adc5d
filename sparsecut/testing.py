"""Tiny random SparseCut models built in code, with no download: for tests, examples and outside checks.

Every decoder family and vision encoder family listed here is a stock transformers config at toy size
(2 encoder layers, hidden 32, 8 px patches; 4 LLM layers, hidden 32). The tokenizer is
`sparsecut.tokenization.byte_tokenizer`.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    Dinov2Config,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedConfig,
    Qwen2Config,
    Qwen3Config,
    SiglipVisionConfig,
    ViTConfig,
)

TINY_VOCAB = 320  # 256 bytes + specials, with room to spare (as real LLMs pad their vocabularies)

TINY_TEXT = dict(  # a toy decoder: 4 layers, hidden 32
    vocab_size=TINY_VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

DECODERS: dict[str, type[PreTrainedConfig]] = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "mistral": MistralConfig,
    "gemma": GemmaConfig,
    "gemma2": Gemma2Config,
    "gemma3": Gemma3TextConfig,
    "phi3": Phi3Config,
}
_DECODER_EXTRAS = {
    "qwen3": dict(head_dim=8),
    "gemma": dict(head_dim=8),
    "gemma2": dict(head_dim=8, sliding_window=16, query_pre_attn_scalar=8),
    "gemma3": dict(head_dim=8, sliding_window=16, query_pre_attn_scalar=8),
    "mistral": dict(sliding_window=None),
    "phi3": dict(sliding_window=None),
}

TINY_VISION = dict(  # a toy encoder: 2 layers, hidden 32, 8 px patches
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
ENCODERS: dict[str, type[PreTrainedConfig]] = {
    "siglip": SiglipVisionConfig,
    "clip": CLIPVisionConfig,
    "vit": ViTConfig,
    "dinov2": Dinov2Config,
}


def tiny_text_config(decoder: str = "llama", **overrides) -> PreTrainedConfig:
    if decoder not in DECODERS:
        raise ValueError(f"Unknown decoder {decoder!r}; choose from {sorted(DECODERS)}.")
    return DECODERS[decoder](**{**TINY_TEXT, **_DECODER_EXTRAS.get(decoder, {}), **overrides})


def tiny_vision_config(encoder: str = "siglip", **overrides) -> PreTrainedConfig:
    if encoder not in ENCODERS:
        raise ValueError(f"Unknown encoder {encoder!r}; choose from {sorted(ENCODERS)}.")
    return ENCODERS[encoder](**{**TINY_VISION, **overrides})


def tiny_model(
    decoder: str = "llama",
    encoder: str = "siglip",
    fusion: str = "cross_attention",
    seed: int = 0,
    **config_overrides,
):
    """A tiny random (model, processor) pair, in eval mode. Shortcut gates start at 0.5 rather than 0 so that
    shortcuts visibly change outputs (pass shortcut_gate_init=0.0 for a baseline-equal start)."""
    from .build import build
    from .tokenization import byte_tokenizer

    torch.manual_seed(seed)
    config_overrides.setdefault("shortcut_gate_init", 0.5)
    config_overrides.setdefault("fusion_num_heads", 4)
    model, processor = build(
        vision=tiny_vision_config(encoder),
        llm=tiny_text_config(decoder),
        tokenizer=byte_tokenizer(),
        fusion=fusion,
        **config_overrides,
    )
    return model.eval(), processor
