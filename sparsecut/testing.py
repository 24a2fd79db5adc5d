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


# LLaVA-1.5's conversation format ("USER: <image>\nWhat is this? ASSISTANT:"), as a template over content items.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for item in message['content'] if item['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}"
    "{{ ' ' if message['role'] != 'assistant' else '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def tiny_llava(
    folder,
    decoder: str = "llama",
    encoder: str = "clip",
    seed: int = 0,
    pad: bool = False,
    projector_bias: bool = True,
):
    """Save a tiny random transformers `LlavaForConditionalGeneration` with its `LlavaProcessor` to `folder` (as a
    llava-hf checkpoint is laid out) and return the model, in eval mode.

    CLIP towers get LLaVA-1.5's preprocessing (shortest side + centre crop; `pad`: LLaVA's own padding to a square
    first) and drop the CLS token ("default"); SigLIP towers get a plain resize and keep every token ("full"), as
    llava-interleave-qwen does. The `<image>` id lies inside the vocabulary, as in LLaVA-1.5; a Qwen2 decoder ties
    its head to the embeddings, as Qwen2-0.5B does.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from .tokenization import byte_tokenizer
    from .vision import CLIP_MEAN, CLIP_STD, HALF

    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    clip = encoder == "clip"
    vision = tiny_vision_config(encoder)
    text = tiny_text_config(decoder, tie_word_embeddings=decoder == "qwen2")
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default" if clip else "full",
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        multimodal_projector_bias=projector_bias,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    side = vision.image_size
    if clip:
        size = dict(size={"shortest_edge": side}, crop_size={"height": side, "width": side}, do_center_crop=True)
        mean, std = CLIP_MEAN, CLIP_STD
    else:
        size = dict(size={"height": side, "width": side}, do_center_crop=False)
        mean, std = HALF, HALF
    images = LlavaImageProcessorPil(**size, do_pad=pad, image_mean=list(mean), image_std=list(std))
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1 if clip else 0,
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model
