"""`sparsecut convert`: a LLaVA checkpoint -> a SparseCut model that starts exactly equal to it.

The paper starts from a trained LLaVA-1.5 and trains the fusion and the shortcuts in its alignment stage. Any
transformers `LlavaForConditionalGeneration` checkpoint (Llama, Vicuna, Mistral, Qwen2 ... decoders; CLIP or SigLIP
towers) is taken here weight by weight (`KEY_MAP`); SparseCut's own parts start where they add nothing:
- fusion "none": LLaVA's projector as it is (the LLaVA-1.5 configuration, `LLAVA_1_5`);
- "concat_mlp": no input norm, and the projector's first layer reads the low-res token with LLaVA's weights and
  the high-res neighbours with zeros ([W | 0 ... 0]), which training moves;
- "cross_attention": a pre-norm residual block whose output layers start at zero (`fusion_residual`), exactly the
  identity on the low-res (LLaVA) tokens; their gradients are not zero, so it trains from the first step;
- shortcut gates at 0.
The processor keeps LLaVA's image preprocessing (resize + centre crop, or padding with int(255 * mean)), its
placeholder, token count and chat template. Weights are read from safetensors only, one source shard at a time, and
written as the same number of shards.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoProcessor, GenerationConfig, PreTrainedConfig

from .configuration import FUSIONS, SparseCutConfig
from .fusion import MultiGrainedFusion
from .modeling import SparseCutForConditionalGeneration, init_weights
from .processing import SparseCutProcessor
from .shortcuts import SparseShortcuts

logger = logging.getLogger(__name__)

# LLaVA key prefix -> SparseCut key prefix, first match wins: the layout transformers >= 4.52 saves, then the one of
# older llava-hf uploads.
KEY_MAP = (
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "fusion.projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("vision_tower.", "vision_tower."),
    ("multi_modal_projector.", "fusion.projector."),
    ("language_model.model.", "language_model.model."),
    ("language_model.lm_head.", "language_model.lm_head."),
)
# SparseCut's configuration that is LLaVA-1.5: low-res view only, LLaVA's projector, no shortcuts (the feature
# layer is the source's `vision_feature_layer`, -2 in LLaVA-1.5).
LLAVA_1_5 = {"fusion": "none", "high_res_grid": 1, "schedule": "none", "feature_layer": -2}
# What a SparseCut checkpoint directory needs besides the weights (a hub download fetches only these, never pickles).
SOURCE_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
BICUBIC = 3


def sparsecut_key(key: str) -> str:
    """The SparseCut name of a LLaVA weight; a key no rule maps is an error that names it."""
    for source, target in KEY_MAP:
        if key.startswith(source):
            return target + key[len(source) :]
    raise KeyError(f"{key!r} is not a weight of a LlavaForConditionalGeneration checkpoint.")


def resolve_source(source: str) -> Path:
    """A local checkpoint folder as it is, or a hub id downloaded (configs, tokenizer and safetensors only)."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=SOURCE_FILES))


def weight_files(folder: Path) -> list[Path]:
    """The safetensors shards of a checkpoint, in the order of its index; pickled weights are refused."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f" (it has {', '.join(pickles)})" if pickles else ""
        raise FileNotFoundError(
            f"{folder} has no .safetensors weights{found}. Weights are only read from safetensors, never unpickled: "
            "load the checkpoint with transformers where you trust it and save_pretrained() it again."
        )
    return files


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
        dtype=llava.text_config.dtype,
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
    resample = getattr(images, "resample", BICUBIC)
    if int(resample) != BICUBIC or not images.do_resize or not images.do_normalize:
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


def new_parts(config: SparseCutConfig, projector: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SparseCut's weights that LLaVA has no counterpart for, plus the projector (widened for concat_mlp), set so
    that the converted model equals the source: gates at 0, the cross-attention block the identity."""
    fusion, shortcuts = MultiGrainedFusion(config), SparseShortcuts(config)
    for module in (*fusion.modules(), shortcuts):
        init_weights(module, config)
    weights = {f"fusion.{key}": value for key, value in fusion.state_dict().items()}
    weights.update({f"shortcuts.{key}": value for key, value in shortcuts.state_dict().items()})
    dtype = projector["fusion.projector.linear_2.weight"].dtype
    for key, value in projector.items():
        if weights[key].shape != value.shape:  # concat_mlp's linear_1: [W | 0 for every high-res neighbour]
            widened = torch.zeros(weights[key].shape, dtype=value.dtype)
            widened[:, : value.shape[1]] = value
            value = widened
        weights[key] = value
    return {key: value.to(dtype).contiguous() for key, value in weights.items()}


def expected_weights(config: SparseCutConfig) -> dict[str, torch.Size]:
    """Name -> shape of every weight a SparseCut model of `config` loads (tied weights once), built on the meta
    device (no memory, no work)."""
    with torch.device("meta"):
        model = SparseCutForConditionalGeneration(config)
    return {key: value.shape for key, value in model.state_dict().items() if key not in tied_keys(model)}


def tied_keys(model: torch.nn.Module) -> set[str]:
    """Names of parameters that are the same tensor as an earlier one (a head tied to the embeddings)."""
    first: dict[int, str] = {}
    tied = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            tied.add(name)
        first.setdefault(id(parameter), name)
    return tied


def convert(
    source: str,
    out: str | Path,
    fusion: str = "none",
    high_res_grid: int | None = None,
    schedule: str = "none",
) -> Path:
    """Convert a LLaVA checkpoint (a local folder or a hub id such as llava-hf/llava-1.5-7b-hf) into a SparseCut
    checkpoint in `out` that starts exactly equal to it; see the module docstring. high_res_grid defaults to 1 for
    fusion "none" (LLaVA-1.5) and 2 otherwise; schedule: "none", "uniform[:k]", "reversed[:k]"."""
    folder, out = resolve_source(source), Path(out)
    llava = AutoConfig.from_pretrained(folder)
    llava_processor = AutoProcessor.from_pretrained(folder)
    config = sparsecut_config(llava, fusion, high_res_grid, schedule, llava_processor.image_token)
    check_token_count(config, llava.vision_feature_select_strategy)
    processor = sparsecut_processor(llava_processor, config)
    expected = expected_weights(config)

    files = weight_files(folder)
    out.mkdir(parents=True, exist_ok=True)
    names = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    if len(files) == 1:
        names = ["model.safetensors"]
    written: dict[str, str] = {}
    projector: dict[str, torch.Tensor] = {}
    for index, (file, name) in enumerate(zip(files, names, strict=True)):
        shard = {}
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                target = sparsecut_key(key)
                if target.startswith("fusion.projector."):
                    projector[target] = f.get_tensor(key)
                else:
                    shard[target] = f.get_tensor(key)
        if index == len(files) - 1:
            shard.update(new_parts(config, projector))
        check_shapes(shard, expected, source)
        save_file(shard, str(out / name), metadata={"format": "pt"})
        written.update(dict.fromkeys(shard, name))
        logger.info("wrote %s (%d tensors)", out / name, len(shard))
    missing = sorted(set(expected) - set(written))
    if missing:
        raise ValueError(f"{source} lacks weights the SparseCut model needs: {', '.join(missing)}.")
    if len(files) > 1:
        index = {"metadata": {}, "weight_map": dict(sorted(written.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    config.save_pretrained(out)
    try:
        generation = GenerationConfig.from_pretrained(folder)
    except OSError:
        generation = GenerationConfig.from_model_config(llava.text_config)
    generation.pad_token_id = processor.tokenizer.pad_token_id
    generation.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def check_shapes(shard: dict[str, torch.Tensor], expected: dict[str, torch.Size], source: str) -> None:
    """Every converted weight must be one the SparseCut model has, with its shape; else an error naming them."""
    unexpected = sorted(key for key in shard if key not in expected)
    mismatched = sorted(
        f"{key} {tuple(value.shape)} vs {tuple(expected[key])}"
        for key, value in shard.items()
        if key in expected and value.shape != expected[key]
    )
    if unexpected or mismatched:
        problems = (("unexpected", unexpected), ("mismatched", mismatched))
        found = "; ".join(f"{kind}: {', '.join(keys)}" for kind, keys in problems if keys)
        raise ValueError(f"{source} does not fit the SparseCut model of its config ({found}).")
