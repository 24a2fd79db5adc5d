"""Tiny random SparseCut models built in code, with no download: for tests, examples and outside checks.

Every decoder family and vision encoder family listed here is a stock transformers config at toy size
(2 encoder layers, hidden 32, 8 px patches; 4 LLM layers, hidden 32). The tokenizer is a byte-level BPE
with no merges (256 byte tokens + a few specials) and a ChatML chat template.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
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
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    SiglipVisionConfig,
    ViTConfig,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_VOCAB = 320  # 256 bytes + specials, with room to spare (as real LLMs pad their vocabularies)

_TEXT = dict(
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

_VISION = dict(
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
    return DECODERS[decoder](**{**_TEXT, **_DECODER_EXTRAS.get(decoder, {}), **overrides})


def tiny_vision_config(encoder: str = "siglip", **overrides) -> PreTrainedConfig:
    if encoder not in ENCODERS:
        raise ValueError(f"Unknown encoder {encoder!r}; choose from {sorted(ENCODERS)}.")
    return ENCODERS[encoder](**{**_VISION, **overrides})


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in code: every UTF-8 byte is a token, plus ChatML specials."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet, key=lambda s: ord(s)))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


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
