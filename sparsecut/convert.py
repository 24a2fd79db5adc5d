"""`sparsecut convert`: a LLaVA checkpoint -> a SparseCut model that starts exactly equal to it.

The paper starts from a trained LLaVA-1.5 and trains the fusion and the shortcuts in its alignment stage. Any
transformers `LlavaForConditionalGeneration` checkpoint (Llama, Vicuna, Mistral, Qwen2 ... decoders; CLIP or SigLIP
towers) is loaded by transformers and its modules become the SparseCut model's, not copied; `KEY_MAP` says which
weight becomes which and is checked on every conversion. SparseCut's own parts start where they add nothing:
- fusion "none": LLaVA's projector as it is (the LLaVA-1.5 configuration, `LLAVA_1_5`);
- "concat_mlp": no input norm, and the projector's first layer reads the low-res token with LLaVA's weights and
  the high-res neighbours with zeros ([W | 0 ... 0]), which training moves;
- "cross_attention": a pre-norm residual block whose output layers start at zero (`fusion_residual`), exactly the
  identity on the low-res (LLaVA) tokens; their gradients are not zero, so it trains from the first step;
- shortcut gates at 0.
The processor keeps LLaVA's image preprocessing (resize + centre crop, or padding with int(255 * mean)), its
placeholder, token count and chat template. Weights are read from safetensors only and keep their dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoProcessor,
    LlavaForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedModel,
)

from .build import check_loading_info, resolve_checkpoint
from .configuration import FUSIONS, SparseCutConfig
from .modeling import SparseCutForConditionalGeneration
from .processing import SparseCutProcessor

# LLaVA weight name -> SparseCut weight name, by prefix, as the installed transformers names them in memory (it reads
# every layout LLaVA checkpoints were saved in).
KEY_MAP = (
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "fusion.projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
# SparseCut's configuration that is LLaVA-1.5: low-res view only, LLaVA's projector, no shortcuts (the feature
# layer is the source's `vision_feature_layer`, -2 in LLaVA-1.5).
LLAVA_1_5 = {"fusion": "none", "high_res_grid": 1, "schedule": "none", "feature_layer": -2}
BICUBIC = 3  # PIL's code for bicubic resampling, which SparseCut's processor uses


def llava_key(key: str) -> str | None:
    """The LLaVA name of a SparseCut weight (the inverse of `sparsecut_key`), or None for SparseCut's own parts
    (the shortcuts, the fusion's norms)."""
    for source, target in KEY_MAP:
        if key.startswith(target):
            return source + key[len(target) :]
    return None


def sparsecut_key(key: str) -> str:
    """The SparseCut name of a LLaVA weight; a key no rule maps is an error that names it."""
    for source, target in KEY_MAP:
        if key.startswith(source):
            return target + key[len(source) :]
    raise KeyError(f"{key!r} is not a weight of a LlavaForConditionalGeneration checkpoint.")


def sparsecut_config(
    llava: PreTrainedConfig, fusion: str, high_res_grid: int | None, schedule: str, image_token: str
) -> SparseCutConfig:
    """The SparseCut config of a LLaVA config with the given fusion: LLaVA's encoder, LLM, feature layer and
    projector, and SparseCut's new parts set to start where they add nothing."""
    if llava.model_type != "llava":
        raise ValueError(
            f"`sparsecut convert` takes LlavaForConditionalGeneration checkpoints (model_type 'llava'); this one is "
            f"{llava.model_type!r}, whose image tokens SparseCut cannot reproduce."
        )
    if not isinstance(llava.vision_feature_layer, int):
        raise ValueError(
            f"vision_feature_layer={llava.vision_feature_layer} concatenates several encoder layers; SparseCut's "
            "feature layer is one layer."
        )
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}.")
    return SparseCutConfig(
        vision_config=llava.vision_config,
        text_config=llava.text_config,
        fusion=fusion,
        high_res_grid=high_res_grid or (1 if fusion == "none" else 2),
        feature_layer=llava.vision_feature_layer,
        schedule=schedule,
        fusion_input_norm=False,
        fusion_residual=fusion == "cross_attention",
        fusion_num_heads=llava.vision_config.num_attention_heads,
        projector_hidden_act=llava.projector_hidden_act,
        projector_bias=llava.multimodal_projector_bias,
        shortcut_gate_init=0.0,
        image_token=image_token,
        image_token_id=llava.image_token_id,
    )


def check_token_count(config: SparseCutConfig, strategy: str) -> None:
    """LLaVA's image tokens must be one per patch, the count SparseCut gives: CLIP with its CLS token dropped
    ("default"), SigLIP with every token kept ("full"). The tower runs on the meta device: shapes, no work."""
    from transformers import AutoModel

    with torch.device("meta"):
        tower = AutoModel.from_config(config.vision_config)
        size = config.image_size
        tokens = tower(pixel_values=torch.zeros(1, 3, size, size)).last_hidden_state.shape[1]
    kept = tokens - 1 if strategy == "default" else tokens
    if kept != config.patches_per_side**2:
        raise ValueError(
            f"This LLaVA gives the LLM {kept} tokens per image (vision_feature_select_strategy={strategy!r}, "
            f"{tokens} encoder tokens) but SparseCut gives one per patch ({config.patches_per_side**2})."
        )


def sparsecut_processor(llava_processor, config: SparseCutConfig) -> SparseCutProcessor:
    """A SparseCutProcessor that prepares images and prompts exactly as the LLaVA processor does."""
    images = llava_processor.image_processor
    size, crop = dict(images.size or {}), dict(getattr(images, "crop_size", None) or {})
    if getattr(images, "do_center_crop", False):
        resize = "crop"
        sides = {size.get("shortest_edge"), crop.get("height"), crop.get("width")}
    else:
        resize = "squash"
        sides = {size.get("height"), size.get("width")}
    if sides != {config.image_size}:
        raise ValueError(
            f"The LLaVA image processor resizes to {size} (crop {crop or 'none'}), not to the encoder's "
            f"{config.image_size} px square that SparseCut's processor makes."
        )
    resample = getattr(images, "resample", BICUBIC)  # PIL's code, or torchvision's InterpolationMode
    bicubic = getattr(resample, "value", resample) in (BICUBIC, "bicubic")
    if not bicubic or not images.do_resize or not images.do_normalize:
        raise ValueError("SparseCut's processor resizes with bicubic resampling and normalises; this LLaVA does not.")
    if not images.do_rescale or abs(images.rescale_factor - 1 / 255) > 1e-12:
        raise ValueError(f"SparseCut's processor scales pixels by 1/255; this LLaVA by {images.rescale_factor}.")
    mean, std = list(images.image_mean), list(images.image_std)
    tokenizer = llava_processor.tokenizer
    if tokenizer.convert_tokens_to_ids(config.image_token) != config.image_token_id:
        raise ValueError(
            f"The tokenizer's {config.image_token!r} is id {tokenizer.convert_tokens_to_ids(config.image_token)} but "
            f"the model's image_token_id is {config.image_token_id}."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return SparseCutProcessor(
        tokenizer,
        image_size=config.image_size,
        high_res_grid=config.high_res_grid,
        num_image_tokens=config.num_image_tokens,
        image_mean=mean,
        image_std=std,
        pad_to_square=bool(getattr(images, "do_pad", False)),
        pad_color=[int(255 * m) for m in mean],  # LLaVA's expand2square colour, truncated
        resize=resize,
        image_token=config.image_token,
        content_items=True,  # LLaVA's chat templates read {"type": "image"} / {"type": "text"} items
        chat_template=llava_processor.chat_template or tokenizer.chat_template,
    )


def causal_lm(llava) -> PreTrainedModel:
    """LLaVA's LLM as the causal LM SparseCut composes: the `...ForCausalLM` of its text config (built on the meta
    device, no memory) holding LLaVA's own decoder and head, which are not copied."""
    with torch.device("meta"):
        language_model = AutoModelForCausalLM.from_config(llava.config.text_config)
    setattr(language_model, language_model.base_model_prefix, llava.model.language_model)
    language_model.lm_head = llava.lm_head
    left = [name for name, t in (*language_model.named_parameters(), *language_model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"The causal LM of {llava.config.text_config.model_type} has parts LLaVA lacks: {left}.")
    language_model.generation_config = llava.generation_config
    return language_model


def set_projector(model: SparseCutForConditionalGeneration, weights: dict[str, torch.Tensor]) -> None:
    """LLaVA's projector weights into the fusion's projector; concat_mlp's wider first layer reads the low-res token
    with LLaVA's weights and the high-res neighbours with zeros: [W | 0 ... 0]."""
    projector = model.fusion.projector
    state = projector.state_dict()
    for key, value in weights.items():
        if state[key].shape != value.shape:
            widened = torch.zeros(state[key].shape, dtype=value.dtype)
            widened[:, : value.shape[1]] = value
            value = widened
        state[key] = value
    projector.load_state_dict(state)


def same_start(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Whether a SparseCut weight is LLaVA's: the same tensor, or for the projector the same values (concat_mlp's
    first layer: LLaVA's columns first, zeros after them)."""
    if ours.data_ptr() == theirs.data_ptr():
        return True
    if ours.shape == theirs.shape:
        return torch.equal(ours, theirs)
    width = theirs.shape[-1]
    return torch.equal(ours[..., :width], theirs) and not ours[..., width:].any()


def check_mapping(llava, model: SparseCutForConditionalGeneration) -> None:
    """Every LLaVA weight must land, by `KEY_MAP`, on the SparseCut weight that holds it, and every SparseCut weight
    outside the fusion and the gates must come from LLaVA; else an error naming them (never random weights)."""
    ours = model.state_dict()
    theirs = {sparsecut_key(key): value for key, value in llava.state_dict().items()}
    unexpected = sorted(key for key in theirs if key not in ours)
    missing = sorted(key for key in ours if key not in theirs and not key.startswith(("fusion.", "shortcuts.")))
    differ = sorted(key for key, value in theirs.items() if key in ours and not same_start(ours[key], value))
    if unexpected or missing or differ:
        problems = (("not in SparseCut", unexpected), ("not from LLaVA", missing), ("not LLaVA's tensor", differ))
        raise ValueError(
            "The LLaVA -> SparseCut mapping failed: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in problems if v)
        )


def convert(
    source: str,
    out: str | Path,
    fusion: str = "none",
    high_res_grid: int | None = None,
    schedule: str = "none",
) -> Path:
    """Convert a LLaVA checkpoint (a local folder or a hub id such as llava-hf/llava-1.5-7b-hf) into a SparseCut
    checkpoint in `out` that starts exactly equal to it; see the module docstring. high_res_grid defaults to 1 for
    fusion "none" (LLaVA-1.5) and 2 otherwise; schedule: "none", "uniform[:k]", "reversed[:k]". The weights keep
    their stored dtype."""
    folder, out = resolve_checkpoint(source), Path(out)
    llava_config = AutoConfig.from_pretrained(folder)
    llava_processor = AutoProcessor.from_pretrained(folder)
    config = sparsecut_config(llava_config, fusion, high_res_grid, schedule, llava_processor.image_token)
    check_token_count(config, llava_config.vision_feature_select_strategy)
    processor = sparsecut_processor(llava_processor, config)

    # transformers reads every LLaVA layout (sharded, older key names); nothing pickled.
    llava, info = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype="auto", use_safetensors=True, output_loading_info=True
    )
    check_loading_info(info, source, "LLaVA checkpoint")
    config.dtype = llava.dtype
    model = SparseCutForConditionalGeneration(
        config, vision_tower=llava.model.vision_tower, language_model=causal_lm(llava)
    )
    set_projector(model, llava.model.multi_modal_projector.state_dict())
    model.fusion.to(llava.dtype)
    model.shortcuts.to(llava.dtype)
    check_mapping(llava, model)
    model.generation_config = llava.generation_config
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
