"""SparseCutConfig: the composite config of a SparseCut model (vision encoder + fusion + shortcuts + LLM).

Implements the paper's configuration space (method note, "Parts" 1-4): which encoder layers are fused, how
(multi-grained fusion), which fused layer becomes the LLM's image tokens, and the sparse shortcut schedule
(encoder layer v -> LLM layer l pairs). The reference code hard-codes the schedule for one model depth; here
it is validated against the actual depths of the two backbones, and `schedule="uniform:k"` builds one.

Layer indexing conventions (the same as LLaVA's `vision_feature_layer`):
- vision layers index the encoder's `hidden_states` tuple, which has depth + 1 entries: 0 is the patch
  embedding output, `depth` the last layer; negative numbers count from the end (-2 = penultimate layer).
- LLM layers index the decoder layers 0 .. depth - 1; negative numbers count from the end. A shortcut to LLM
  layer l is added to the hidden states right *before* layer l runs.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .vision import crops_per_side

FUSIONS = ("cross_attention", "concat_mlp", "none")
MAX_DEFAULT_SHORTCUTS = 8  # the paper's 8 pairs


def _depth(config: PreTrainedConfig, what: str) -> int:
    depth = getattr(config, "num_hidden_layers", None)
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"The {what} config ({type(config).__name__}) has no usable num_hidden_layers.")
    return depth


def _side(value) -> int:
    """Square side of an `image_size` that may be an int or an (h, w) pair."""
    if isinstance(value, (list, tuple)):
        if value[0] != value[1]:
            raise ValueError(f"Only square encoder inputs are supported, got image_size={value}.")
        return int(value[0])
    return int(value)


def normalize_index(index: int, size: int, what: str, depth_text: str) -> int:
    """Map a possibly negative index into range(size), or raise a ValueError that names the depth."""
    if not -size <= index < size:
        raise ValueError(f"{what} index {index} is out of range: {depth_text}.")
    return index % size


def uniform_schedule(k: int, vision_depth: int, llm_depth: int, reverse: bool = False) -> tuple[list[int], list[int]]:
    """k (vision layer, LLM layer) pairs spread evenly over both depths.

    Vision hidden state i*(Dv+1)/k pairs with LLM layer (i+1)*Dl/k - 1, which gives the reference code's lists
    for CLIP-L (24 layers, 25 hidden states) and a 40-layer LLM: [0, 3, ..., 21] -> [4, 9, ..., 39].
    `reverse` pairs deep encoder layers with shallow LLM layers (the paper's reversed option).
    """
    if not 1 <= k <= min(vision_depth + 1, llm_depth):
        raise ValueError(
            f"Cannot spread {k} shortcuts: the vision encoder has {vision_depth} layers "
            f"({vision_depth + 1} hidden states) and the LLM has {llm_depth} layers; "
            f"k must be 1..{min(vision_depth + 1, llm_depth)}."
        )
    vision = [i * (vision_depth + 1) // k for i in range(k)]
    llm = [(i + 1) * llm_depth // k - 1 for i in range(k)]
    return (vision[::-1] if reverse else vision), llm


class SparseCutConfig(PreTrainedConfig):
    r"""Configuration of [`SparseCutForConditionalGeneration`].

    Args:
        vision_config: config of any transformers vision encoder with `image_size`, `patch_size` and
            `num_hidden_layers` (CLIPVision, SiglipVision, ViT, DINOv2, ...).
        text_config: config of any decoder-only LLM that transformers ships (Llama, Qwen2/3, Mistral, Gemma, Phi3 ...).
        fusion: how low-res and high-res tokens of one encoder layer are fused: "cross_attention" (low-res
            queries attend to the high-res crops), "concat_mlp" (each low-res token concatenated with the
            grid x grid high-res tokens covering its area) or "none" (low-res tokens only, LLaVA-1.5 style).
        high_res_grid: the high-res view is the image at `high_res_grid` times the encoder size, cut into
            high_res_grid x high_res_grid encoder-size crops. The processor emits 1 + grid**2 views.
        high_res_overlap: cut the high-res view into (2 * grid - 1)**2 crops at half a crop's stride instead, and
            take each high-res patch token from the crop nearest to it (`vision.stitch_overlapping_crops`), so
            that no crop border runs through detail narrower than a quarter crop; the fusion and the LLM input
            are unchanged, the encoder sees 1 + (2 * grid - 1)**2 views. Not in the paper; needs an even number
            of patches per side.
        feature_layer: encoder layer whose fused features replace the `<image>` placeholder tokens.
        schedule: builds the shortcut pairs when the explicit lists are not given: "uniform" (k = min(8, depths)),
            "uniform:k", "reversed" / "reversed:k", or "none" for no shortcuts.
        shortcut_vision_layers: encoder layer of each shortcut (hidden-states index, negatives allowed).
        shortcut_llm_layers: LLM decoder layer each shortcut is added before (negatives allowed).
        append_high_res_tokens: cost-comparison baseline: all views' tokens go into the LLM input
            ((1 + grid**2) x as many image tokens); requires fusion="none".
        fusion_num_heads: attention heads of the cross-attention fusion; must divide the encoder hidden size.
        fusion_ffn_ratio: FFN width of the cross-attention block, as a multiple of the encoder hidden size.
        fusion_input_norm: LayerNorm the encoder features before cross_attention / concat_mlp fusion, so that
            layers with very different scales can share one fusion module.
        fusion_residual: cross_attention as a pre-norm residual block (LayerNorms on the attention's and the FFN's
            inputs only) whose output layers (o_proj, the FFN's second linear) start at zero, so that a fresh block
            passes the low-res tokens through exactly and training grows the high-res detail from there; instead
            of the post-norm block, which changes the tokens from the start. `sparsecut convert` uses it (with
            fusion_input_norm off) to start exactly at the source LLaVA.
        projector_hidden_act: activation of the 2-layer projector MLP to the LLM hidden size.
        projector_bias: whether the projector's two linear layers have biases (LLaVA's
            `multimodal_projector_bias`; off in some LLaVA checkpoints).
        image_token_scale: None (LLaVA's projector), or centre each image's projected tokens (remove their mean
            over the image) and scale them to this RMS times a learned per-channel gain (`fusion.ImageTokenNorm`),
            so that image tokens differ from each other and enter the LLM at the scale of its text embeddings.
            `sparsecut.build(..., image_token_scale="auto")` takes the RMS of the LLM's input embeddings. Not in
            the paper; measured why it exists: docs/findings.md.
        shortcut_gate_init: initial value of the per-shortcut, per-channel gate; 0 makes a fresh model equal
            its shortcut-free baseline at step 0.
        lora: peft `LoraConfig` arguments of LoRA adapters injected into the LLM (stage 2), or None.
        lora_needs_image: the LoRA adapters act only on conversations that hold an image; without one, the LLM
            answers as its base model (exactly: the adapters are switched off for that forward pass and its
            decode steps). For a small LLM whose adapters were trained on images alone, which otherwise carry
            the image task into every text-only answer. A batch that mixes both keeps the adapters on.
        base_llm: where the LLM's base weights come from when a checkpoint ships without them (an alias such as
            "smollm2-135m", a .gguf file, a path or a hub id); None for checkpoints that contain the whole LLM.
        image_token: the placeholder token string in the tokenizer.
        image_token_id: its id (set by `sparsecut.build` from the tokenizer).
    """

    model_type = "sparsecut"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    fusion: str = "cross_attention"
    high_res_grid: int = 2
    high_res_overlap: bool = False
    feature_layer: int = -2
    schedule: str | None = None
    shortcut_vision_layers: list[int] | None = None
    shortcut_llm_layers: list[int] | None = None
    append_high_res_tokens: bool = False
    fusion_num_heads: int = 8
    fusion_ffn_ratio: int = 4
    fusion_input_norm: bool = True
    fusion_residual: bool = False
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    image_token_scale: float | None = None
    shortcut_gate_init: float = 0.0
    lora: dict | None = None
    lora_needs_image: bool = False
    base_llm: str | None = None
    image_token: str = "<image>"
    image_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # The LLM decides whether its head is tied; the composite config mirrors it (as LLaVA does).
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        self._validate()

    def _validate(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}.")
        if self.image_token_scale is not None and not (
            isinstance(self.image_token_scale, (int, float)) and self.image_token_scale > 0
        ):
            raise ValueError(f"image_token_scale must be a positive number or None, got {self.image_token_scale!r}.")
        if not isinstance(self.high_res_grid, int) or self.high_res_grid < 1:
            raise ValueError(f"high_res_grid must be an integer >= 1, got {self.high_res_grid!r}.")
        if not isinstance(self.lora_needs_image, bool):
            raise ValueError(f"lora_needs_image must be true or false, got {self.lora_needs_image!r}.")
        for key in ("fusion_residual", "projector_bias"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}.")
        if not isinstance(self.high_res_overlap, bool):
            raise ValueError(f"high_res_overlap must be true or false, got {self.high_res_overlap!r}.")
        if self.append_high_res_tokens and self.fusion != "none":
            raise ValueError(
                "append_high_res_tokens=True puts every view's tokens in the input; it needs fusion='none'."
            )
        for key in ("image_size", "patch_size", "hidden_size"):
            if getattr(self.vision_config, key, None) is None:
                raise ValueError(
                    f"The vision encoder config ({type(self.vision_config).__name__}) has no `{key}`; "
                    "SparseCut needs a ViT-style encoder (CLIPVision, SiglipVision, ViT, DINOv2, ...)."
                )
        # A remainder is allowed: the encoder's patch convolution drops the last image_size % patch_size pixels of
        # every view (SigLIP-so400m at 384 px with 14 px patches sees 27 x 27 patches), as it does in LLaVA.
        if self.high_res_overlap and self.image_size % self.patch_size:
            raise ValueError(
                f"high_res_overlap needs image_size a multiple of patch_size, got {self.image_size} px and "
                f"{self.patch_size} px patches."
            )
        if self.high_res_overlap and self.patches_per_side % 2:
            raise ValueError(
                f"high_res_overlap shifts crops by half a crop, which needs an even number of patches per side; "
                f"this encoder has {self.patches_per_side} ({self.image_size} px / {self.patch_size} px patches)."
            )
        if self.fusion == "cross_attention" and self.vision_config.hidden_size % self.fusion_num_heads:
            raise ValueError(
                f"fusion_num_heads={self.fusion_num_heads} does not divide the encoder hidden size "
                f"{self.vision_config.hidden_size}."
            )
        vision_states = self.vision_depth + 1
        vision_text = (
            f"the vision encoder has {self.vision_depth} layers, "
            f"so hidden-states indices run -{vision_states}..{self.vision_depth}"
        )
        llm_text = f"the LLM has {self.llm_depth} layers, indices -{self.llm_depth}..{self.llm_depth - 1}"
        normalize_index(self.feature_layer, vision_states, "feature_layer", vision_text)
        self._resolve_schedule()
        for v in self.shortcut_vision_layers:
            normalize_index(v, vision_states, "Shortcut vision layer", vision_text)
        for layer in self.shortcut_llm_layers:
            normalize_index(layer, self.llm_depth, "Shortcut LLM layer", llm_text)

    def _resolve_schedule(self) -> None:
        vision, llm = self.shortcut_vision_layers, self.shortcut_llm_layers
        if (vision is None) != (llm is None):
            raise ValueError(
                "Give both shortcut_vision_layers and shortcut_llm_layers, or neither (then `schedule` builds them)."
            )
        if vision is not None:
            vision, llm = [int(v) for v in vision], [int(v) for v in llm]
            if len(vision) != len(llm):
                raise ValueError(
                    f"shortcut_vision_layers has {len(vision)} entries but shortcut_llm_layers has {len(llm)}; "
                    "they are pairs and must have equal lengths."
                )
            if self.schedule is not None and self.schedule_pairs(self.schedule) != (vision, llm):
                raise ValueError(
                    f"schedule={self.schedule!r} disagrees with the explicit shortcut lists; give one or the other."
                )
        else:
            vision, llm = self.schedule_pairs(self.schedule or "uniform")
        self.shortcut_vision_layers, self.shortcut_llm_layers = vision, llm

    def schedule_pairs(self, schedule: str) -> tuple[list[int], list[int]]:
        """Expand a schedule string ("uniform", "uniform:k", "reversed[:k]", "none") for these depths."""
        name, _, k_text = schedule.partition(":")
        if name == "none":
            return [], []
        if name not in ("uniform", "reversed"):
            raise ValueError(f"Unknown schedule {schedule!r}: use 'uniform[:k]', 'reversed[:k]' or 'none'.")
        if k_text:
            if not k_text.isdigit():
                raise ValueError(f"Schedule {schedule!r}: k must be a positive integer.")
            k = int(k_text)
        else:
            k = min(MAX_DEFAULT_SHORTCUTS, self.vision_depth + 1, self.llm_depth)
        return uniform_schedule(k, self.vision_depth, self.llm_depth, reverse=name == "reversed")

    # Derived quantities: computed, never stored, so a loaded config cannot disagree with itself.
    @property
    def vision_depth(self) -> int:
        return _depth(self.vision_config, "vision encoder")

    @property
    def llm_depth(self) -> int:
        return _depth(self.text_config, "LLM")

    @property
    def image_size(self) -> int:
        return _side(self.vision_config.image_size)

    @property
    def patch_size(self) -> int:
        return _side(self.vision_config.patch_size)

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_views(self) -> int:
        """Views per image in `pixel_values`: the low-res view plus grid**2 high-res crops, or (2 * grid - 1)**2
        overlapping ones."""
        return 1 + crops_per_side(self.high_res_grid, self.high_res_overlap) ** 2

    @property
    def num_fused_views(self) -> int:
        """Views per image after overlapping crops are stitched: the low-res view plus grid**2 crops."""
        return 1 + self.high_res_grid**2

    @property
    def uses_high_res(self) -> bool:
        return self.fusion != "none" or self.append_high_res_tokens

    @property
    def num_image_tokens(self) -> int:
        """LLM input tokens per image: one per low-res patch (LLaVA-1.5's count), or every view's in append mode."""
        tokens = self.patches_per_side**2
        return tokens * self.num_fused_views if self.append_high_res_tokens else tokens

    @property
    def fused_vision_layers(self) -> list[int]:
        """Sorted, normalised encoder layers whose fused features are needed (feature layer + shortcuts)."""
        size = self.vision_depth + 1
        return sorted({self.feature_layer % size, *(v % size for v in self.shortcut_vision_layers)})

    @property
    def num_shortcuts(self) -> int:
        return len(self.shortcut_vision_layers)
