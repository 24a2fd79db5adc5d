"""SparseCutForConditionalGeneration: the whole model, composed from stock transformers backbones.

Vision encoder (any `AutoModel` vision config) -> multi-grained fusion of the selected layers (one batched
call) -> the feature layer's fused tokens replace the `<image>` placeholders (method note, "Parts" 3) ->
the LLM (any `AutoModelForCausalLM`) runs with sparse shortcuts adding the other layers' fused tokens at the
image positions before their LLM layers ("Parts" 4). The LLM keeps its own KV cache, so decode steps cost
exactly what the LLM alone costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import ModelOutput

from .adapters import MergedAdapters, inject_lora, switch_merged_adapters
from .configuration import SparseCutConfig
from .fusion import ImageTokenNorm, MultiGrainedFusion
from .shortcuts import SparseShortcuts
from .vision import encode_layers, stitch_overlapping_crops

IGNORE_INDEX = -100


@dataclass
class ShortcutStats:
    """What one forward pass reveals about the fusion, for plots and analysis (all on the CPU, float32).

    ratios[k, i, t]: ‖added‖ / ‖hidden‖ of shortcut k at image token t of image i (NaN where the shortcut's
    LLM layer did not run). fusion_attention[j, i, q, h]: cross-attention weight of low-res patch q on
    high-res token h (crop-major, row-major inside a crop) in fused layer j; fusion_contribution[j, i, q, n]:
    concat_mlp share of neighbour n (0 = the low-res token itself).
    """

    vision_layers: list[int]
    llm_layers: list[int]
    fused_layers: list[int]
    patches_per_side: int
    high_res_grid: int
    ratios: torch.Tensor
    fusion_attention: torch.Tensor | None = None
    fusion_contribution: torch.Tensor | None = None


@dataclass
class SparseCutOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    shortcut_stats: ShortcutStats | None = None


@dataclass
class ImageFeatures:
    inputs: torch.Tensor  # (n_images, T, D): replaces the placeholders
    shortcuts: torch.Tensor  # (k, n_images, T, D): added before the shortcut LLM layers
    attention: torch.Tensor | None = None  # (L, n_images, P, G*P)
    contribution: torch.Tensor | None = None  # (L, n_images, P, 1 + G)


class SparseCutPreTrainedModel(PreTrainedModel):
    config: SparseCutConfig
    config_class = SparseCutConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, SparseShortcuts):
            nn.init.constant_(module.gate, self.config.shortcut_gate_init)
        elif isinstance(module, ImageTokenNorm):
            nn.init.constant_(module.weight, module.initial_scale)
        elif isinstance(module, nn.LayerNorm) and module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class SparseCutForConditionalGeneration(SparseCutPreTrainedModel, GenerationMixin):
    """SparseCut MLLM. Pass `vision_tower` / `language_model` to reuse already-loaded backbones."""

    def __init__(
        self,
        config: SparseCutConfig,
        vision_tower: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        self.vision_tower = vision_tower if vision_tower is not None else AutoModel.from_config(config.vision_config)
        self.fusion = MultiGrainedFusion(config)
        self.language_model = (
            language_model if language_model is not None else AutoModelForCausalLM.from_config(config.text_config)
        )
        if config.lora:
            inject_lora(self.language_model, config.lora)
        self.shortcuts = SparseShortcuts(config)
        self.shortcuts.attach(self.decoder_layers)
        self._adapters_on = True  # what the last prefill decided (`_switch_adapters`); decode steps keep it
        self._merged_adapters: MergedAdapters | None = None  # set by `adapters.merge_lora`
        self.post_init()

    def _switch_adapters(self, input_ids, pixel_values, past_key_values) -> None:
        """With `config.lora_needs_image`, switch the LoRA adapters off for a text-only conversation. A prefill
        (empty cache) decides from its tokens; a decode step (one new token, no image) keeps that decision."""
        merged = self._merged_adapters
        if not (self.config.lora_needs_image and (self.config.lora or (merged is not None and merged.keep_base))):
            return
        prefill = past_key_values is None or past_key_values.get_seq_length() == 0
        if not prefill:
            return
        image_tokens = input_ids is not None and bool((input_ids == self.config.image_token_id).any())
        on = pixel_values is not None or image_tokens
        if on == self._adapters_on:
            return
        if merged is not None:  # `adapters.merge_lora(keep_base=True)`: swap the merged and the base weights
            switch_merged_adapters(self, on)
            self._adapters_on = on
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        # peft's own `enable_adapters` also sets requires_grad, which is `training.train.set_trainable`'s to decide.
        for module in self.language_model.modules():
            if isinstance(module, BaseTunerLayer):
                module._disable_adapters = not on
        self._adapters_on = on

    # --- backbone access -------------------------------------------------------------------------------------
    @property
    def decoder_layers(self) -> nn.ModuleList:
        layers = getattr(self.language_model.base_model, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(
                f"{type(self.language_model).__name__} has no `layers` list of decoder layers to add shortcuts to."
            )
        return layers

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def get_decoder(self) -> nn.Module:
        return self.language_model.base_model

    # --- vision side -----------------------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor, output_stats: bool = False) -> ImageFeatures:
        """pixel_values: (n_images, views, 3, H, W) -> fused features of the feature layer and every shortcut."""
        config = self.config
        if pixel_values.ndim != 5 or pixel_values.shape[1] != config.num_views:
            raise ValueError(
                f"pixel_values must have shape (images, {config.num_views}, 3, H, W) "
                f"for high_res_grid={config.high_res_grid}, high_res_overlap={config.high_res_overlap}, "
                f"got {tuple(pixel_values.shape)}."
            )
        n_images = pixel_values.shape[0]
        views = config.num_views if config.uses_high_res else 1  # LLaVA-style fusion reads the low-res view only
        layers = config.fused_vision_layers
        dtype = self.vision_tower.dtype
        tokens = encode_layers(
            self.vision_tower, pixel_values[:, :views].flatten(0, 1).to(dtype), layers, config.patches_per_side**2
        )  # (L, n*V, P, d)
        tokens = tokens.view(len(layers) * n_images, views, *tokens.shape[2:])  # (L*n, V, P, d)
        if config.high_res_overlap and views > 1:
            # (L*n, 1 + (2g-1)², P, d) -> (L*n, 1 + g², P, d)
            tokens = stitch_overlapping_crops(tokens, config.high_res_grid, config.patches_per_side)
        fusion_dtype = self.fusion.projector.linear_1.weight.dtype
        fused = self.fusion(tokens.to(fusion_dtype), output_stats=output_stats)
        per_layer = fused.tokens.view(len(layers), n_images, *fused.tokens.shape[1:])  # (L, n, T, D)
        slot = {layer: i for i, layer in enumerate(layers)}
        feature = config.feature_layer % (config.vision_depth + 1)

        def by_layer(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.view(len(layers), n_images, *x.shape[1:])

        return ImageFeatures(
            inputs=per_layer[slot[feature]],
            shortcuts=per_layer[[slot[v] for v in self.shortcuts.vision_layers]],
            attention=by_layer(fused.attention),
            contribution=by_layer(fused.contribution),
        )

    def _embed_with_images(
        self, input_ids: torch.LongTensor, features: ImageFeatures | None, past_key_values: Cache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image_mask = input_ids == self.config.image_token_id  # (B, T)
        embedding = self.get_input_embeddings()
        # The placeholder id may lie outside the LLM's vocabulary (no embedding resize), so look up id 0 there.
        outside = image_mask & (input_ids >= embedding.num_embeddings)
        embeds = embedding(input_ids.masked_fill(outside, 0))
        if features is None:
            # A decode step's token is the model's own: an image token it emits (LLaVA-1.5's <image> id lies inside
            # its vocabulary) is an ordinary token there, as in LLaVA. In a prompt, image tokens need images.
            # Reading the count back is a graph break under torch.compile, which `generate` applies to the
            # static-cache decode steps only, so the check runs eagerly.
            if not torch.compiler.is_compiling() and (n_tokens := int(image_mask.sum())):
                if past_key_values is None or past_key_values.get_seq_length() == 0:
                    raise ValueError(f"input_ids contain {n_tokens} image tokens but no pixel_values were given.")
            return embeds, image_mask
        n_tokens = int(image_mask.sum())
        n_features = features.inputs.shape[0] * features.inputs.shape[1]
        if n_tokens != n_features:
            raise ValueError(
                f"Image features and image tokens do not match: the text has {n_tokens} image tokens but "
                f"{features.inputs.shape[0]} image(s) give {n_features} features "
                f"({features.inputs.shape[1]} per image)."
            )
        flat = features.inputs.reshape(-1, features.inputs.shape[-1]).to(embeds.device, embeds.dtype)
        return embeds.masked_scatter(image_mask[..., None].to(embeds.device), flat), image_mask

    # --- the LLM side ----------------------------------------------------------------------------------------
    def _custom_mask(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A 4D boolean attention mask (True: attend; the collator's packed sequences) in the form the LLM's
        attention takes it: as it is for SDPA, additive for eager attention."""
        implementation = self.language_model.config._attn_implementation
        if implementation == "sdpa":
            return mask
        if implementation == "eager":
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        raise ValueError(
            f"Packed sequences need a 4D attention mask, which {implementation!r} attention does not take; "
            "load the LLM with attn_implementation='sdpa' or 'eager'."
        )

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head plus the output transforms some families apply (Gemma 2/3 soft-capping, Cohere/Granite scales)."""
        logits = self.get_output_embeddings()(hidden)
        text = self.config.text_config
        if (scale := getattr(text, "logit_scale", None)) is not None:
            logits = logits * scale
        if (scaling := getattr(text, "logits_scaling", None)) is not None:
            logits = logits / scaling
        if (cap := getattr(text, "final_logit_softcapping", None)) is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        shortcut_scales: list[float] | torch.Tensor | None = None,
        output_shortcut_stats: bool = False,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> SparseCutOutput:
        """Standard causal-LM forward with images.

        pixel_values: (n_images, 1 + grid**2, 3, H, W), images in the order their placeholders appear (sample
        by sample). labels: -100 where no loss is taken; the loss is computed from the hidden states at the
        label positions only (so `logits_to_keep=1` skips the full-vocabulary logits during training).
        shortcut_scales: one float per shortcut, multiplying its contribution (0 switches it off).
        output_shortcut_stats: also return `shortcut_stats` (see `ShortcutStats`); `record_stats()` does the
        same for `generate`.
        """
        want_stats = output_shortcut_stats or self._stats_sink is not None
        self._switch_adapters(input_ids, pixel_values, past_key_values)
        features = None
        if pixel_values is not None:
            if input_ids is None:
                raise ValueError(
                    "Images need input_ids to locate their placeholder tokens; inputs_embeds alone cannot."
                )
            features = self.get_image_features(pixel_values, output_stats=want_stats)
            if self._features_sink is not None:  # `inspection.relevance` takes gradients at these features
                self._features_sink.append(features)
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("Pass input_ids or inputs_embeds.")
            inputs_embeds, image_mask = self._embed_with_images(input_ids, features, past_key_values)
        else:
            image_mask = None
        ratios: dict[int, torch.Tensor] | None = {} if (want_stats and features is not None) else None
        self.shortcuts.prepare(
            image_mask, None if features is None else features.shortcuts.flatten(1, 2), shortcut_scales, ratios
        )
        if attention_mask is not None and attention_mask.ndim == 4 and attention_mask.dtype == torch.bool:
            attention_mask = self._custom_mask(attention_mask, inputs_embeds.dtype)
        try:
            outputs = self.language_model.base_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        finally:
            # Gradient checkpointing replays the layers (and their hooks) during backward: keep the state then.
            # (`training` first: `is_activation_checkpointing` walks every module, a cost in each decode step.)
            if not (self.training and self.is_activation_checkpointing):
                self.shortcuts.clear()
        hidden = outputs.last_hidden_state  # (B, T, D)

        loss = None
        logits = None
        if labels is not None and (not isinstance(logits_to_keep, int) or logits_to_keep != 0):
            loss = self._loss_at_labels(hidden, labels, num_items_in_batch)
        if isinstance(logits_to_keep, int):
            kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            kept = hidden[:, logits_to_keep]
        logits = self.compute_logits(kept)
        if labels is not None and loss is None:  # full logits were computed anyway: take the loss from them
            loss = self._loss_from_logits(logits, labels, num_items_in_batch)

        stats = None
        if ratios is not None:
            stats = self._collect_stats(features, ratios)
            if self._stats_sink is not None:
                self._stats_sink.append(stats)
        return SparseCutOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
            shortcut_stats=stats if output_shortcut_stats else None,
        )

    @staticmethod
    def _reduce(token_losses: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        if num_items_in_batch is None:
            return token_losses.mean() if token_losses.numel() else token_losses.sum()
        return token_losses.sum() / num_items_in_batch

    def _loss_at_labels(self, hidden: torch.Tensor, labels: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        targets = labels[:, 1:].to(hidden.device)
        selected = targets != IGNORE_INDEX  # (B, T-1)
        logits = self.compute_logits(hidden[:, :-1][selected])  # (M, V): only where the loss needs them
        token_losses = F.cross_entropy(logits.float(), targets[selected], reduction="none")
        return self._reduce(token_losses, num_items_in_batch)

    def _loss_from_logits(self, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        targets = labels[:, 1:].to(logits.device)
        selected = targets != IGNORE_INDEX
        token_losses = F.cross_entropy(logits[:, :-1][selected].float(), targets[selected], reduction="none")
        return self._reduce(token_losses, num_items_in_batch)

    # --- introspection ---------------------------------------------------------------------------------------
    _stats_sink: list | None = None
    _features_sink: list | None = None

    def record_stats(self) -> StatsRecorder:
        """Context manager collecting `ShortcutStats` of every forward that sees images (e.g. a generate prefill):

        with model.record_stats() as recorded:
            model.generate(**inputs)
        stats = recorded.last
        """
        return StatsRecorder(self)

    def _collect_stats(self, features: ImageFeatures, ratios: dict[int, torch.Tensor]) -> ShortcutStats:
        n_images, tokens = features.inputs.shape[:2]
        table = torch.full((self.config.num_shortcuts, n_images, tokens), float("nan"))
        for index, ratio in ratios.items():
            table[index] = ratio.float().cpu().view(n_images, tokens)

        def cpu(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.detach().float().cpu()

        return ShortcutStats(
            vision_layers=list(self.shortcuts.vision_layers),
            llm_layers=list(self.shortcuts.llm_layers),
            fused_layers=list(self.config.fused_vision_layers),
            patches_per_side=self.config.patches_per_side,
            high_res_grid=self.config.high_res_grid,
            ratios=table,
            fusion_attention=cpu(features.attention),
            fusion_contribution=cpu(features.contribution),
        )


class StatsRecorder:
    """See `SparseCutForConditionalGeneration.record_stats`."""

    def __init__(self, model: SparseCutForConditionalGeneration):
        self.model = model
        self.stats: list[ShortcutStats] = []

    @property
    def last(self) -> ShortcutStats | None:
        return self.stats[-1] if self.stats else None

    def __enter__(self) -> StatsRecorder:
        self.model._stats_sink = self.stats
        return self

    def __exit__(self, *exc) -> None:
        self.model._stats_sink = None
