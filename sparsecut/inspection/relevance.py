"""Answer relevance: how much each part of the image contributed to the answer the model gave.

`answer_relevance` scores, for one forward and one backward pass, the log-probability of the answer's tokens
(teacher-forced: the answer is fed back after its prompt) and attributes it to

- `image[i, t]`: image token t of image i, the fused token that replaces an `<image>` placeholder in the
  LLM's input (one per low-res patch);
- `high_res[j, i, h]`: high-res token h of image i at the fusion's input (after its input norm), for fused
  vision layer j, crop-major like the fusion's keys (`visuals.high_res_to_grid` places them on the image);
- `shortcuts[k, i, t]`: shortcut k's fused features at image token t, before its gate.

The method is gradient x input: relevance of a token x = sum over channels of d log p(answer) / dx * x. Why
this one:
- one backward pass, whatever the number of tokens scored (integrated gradients needs one per step, and its
  straight-line path from a baseline would have to scale the LLM's image tokens and the fusion's inputs at
  once, which no single baseline makes consistent);
- it needs gradients with respect to activations only, never weights, so it runs unchanged under 8-bit and
  4-bit loading (bitsandbytes layers pass gradients to their inputs) and with frozen weights;
- it reads the same three places for every fusion (`concat_mlp`, `cross_attention`, `none`), with no rule
  per layer type as relevancy propagation needs (and the LLM is any transformers decoder);
- the tokens are taken where the first-order estimate is meaningful: the LLM's image tokens are centred per
  image (`ImageTokenNorm`), so x = 0 is "an average patch", and the high-res tokens after the fusion's input
  LayerNorm (before it, a LayerNorm's scale invariance makes gradient x input vanish).
It is exact to first order: relevance of x equals the derivative of log p(answer) along x, which the tests
check against a finite difference. Tokens that cannot reach the answer (masked out, or after it) get exactly 0.

It is one extra forward and backward pass, run only when called: generation never pays for it.

Maps (`Relevance.low_res_map`, `high_res_map`) sum a patch's relevance over the paths it reaches the LLM by
(its image token and every shortcut; the fused layers of a high-res token); `strength` is what the demo draws
and the pointing game scores: the magnitude, since a patch the answer rests on can push either way (the
answer "red" is also made more likely by lowering "orange"), and the sign of a single patch is noisy. That
choice, and counting the shortcuts in, were fixed on questions generated for it (training phrasings), before
the held-out pointing run (see `evaluation.pointing`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..modeling import ShortcutStats, SparseCutForConditionalGeneration


@dataclass
class Relevance:
    """Gradient x input of log p(answer) for image tokens, high-res tokens and shortcut features (CPU, float32).

    Positive: the token, as it is, made the answer more likely; negative: less likely; 0: no effect.
    """

    image: torch.Tensor  # (n_images, T): the LLM's image tokens, T = side*side low-res patches
    shortcuts: torch.Tensor  # (k, n_images, T): each shortcut's features at the image tokens
    high_res: torch.Tensor | None  # (L, n_images, G*P) per fused layer; None where no high-res view is fused
    logprob: torch.Tensor  # (B,): the scored answer tokens' summed log-probability, per sample
    fused_layers: list[int]
    vision_layers: list[int]  # of the shortcuts
    patches_per_side: int
    high_res_grid: int
    stats: ShortcutStats | None = None  # from the same forward pass

    def low_res_map(self, image_index: int = 0, shortcuts: bool = True) -> torch.Tensor:
        """(side, side) relevance per low-res patch of everything the LLM receives there: the image token plus,
        with `shortcuts`, every shortcut's features at that patch."""
        side = self.patches_per_side
        total = self.image[image_index] + (self.shortcuts[:, image_index].sum(0) if shortcuts else 0)
        return total[: side * side].view(side, side)

    def high_res_map(self, image_index: int = 0) -> torch.Tensor | None:
        """(grid*side, grid*side) relevance of the high-res tokens on the whole image, summed over the fused
        layers; None where the fusion reads no high-res view."""
        if self.high_res is None:
            return None
        side, grid = self.patches_per_side, self.high_res_grid
        crops = self.high_res[:, image_index].sum(0).view(grid, grid, side, side)  # (cy, cx, row, col)
        return crops.permute(0, 2, 1, 3).reshape(grid * side, grid * side)  # (cy, row, cx, col)

    def shortcut_map(self, shortcut: int, image_index: int = 0) -> torch.Tensor:
        """(side, side) relevance of shortcut `shortcut`'s features on the low-res patch grid."""
        side = self.patches_per_side
        return self.shortcuts[shortcut, image_index, : side * side].view(side, side)


def strength(values: torch.Tensor) -> torch.Tensor:
    """How much each token mattered to the answer, either way: |relevance|."""
    return values.abs()


class _FusionTaps:
    """Forward hooks that make the fusion's input a leaf that needs gradients (so that frozen or quantized
    weights still pass gradients back to it) and keep the high-res tokens after the fusion's input norm."""

    def __init__(self, model: SparseCutForConditionalGeneration):
        self.fusion = model.fusion
        self.normed: list[torch.Tensor] = []  # input_norm outputs in call order: low-res, then high-res

    def __enter__(self) -> _FusionTaps:
        def leaf(module, args, kwargs):
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs

        def keep(module, args, output):
            self.normed.append(output)

        self.handles = [
            self.fusion.register_forward_pre_hook(leaf, with_kwargs=True),
            self.fusion.input_norm.register_forward_hook(keep),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    @property
    def high_res(self) -> torch.Tensor | None:
        """(N, G, P, d) high-res tokens after the input norm; None if the fusion read no high-res view."""
        return self.normed[1] if len(self.normed) == 2 else None


def answer_relevance(
    model: SparseCutForConditionalGeneration,
    input_ids: torch.LongTensor,
    pixel_values: torch.Tensor,
    answer_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    shortcut_scales: Sequence[float] | None = None,
) -> Relevance:
    """Relevance of every image token, high-res token and shortcut feature to the answer tokens.

    input_ids: (B, T) prompts followed by their answers; answer_mask: (B, T) True at the answer tokens whose
    log-probabilities are scored (all of an answer's tokens, or one of them). Samples in a batch are scored
    independently, so batching does not change any sample's relevance.
    """
    if pixel_values is None:
        raise ValueError("Relevance to image tokens needs an image: pixel_values is None.")
    answer_mask = answer_mask.to(input_ids.device).bool()
    if answer_mask[:, 0].any():
        raise ValueError("The first token has nothing before it to predict it from; it cannot be scored.")
    if not answer_mask.any():
        raise ValueError("answer_mask selects no tokens to score.")
    first = int(answer_mask.any(0).nonzero()[0])
    keep = input_ids.shape[1] - first + 1  # the logits at positions first-1 ... T-1 predict tokens first ... T
    recorded: list = []
    with torch.enable_grad(), _FusionTaps(model) as taps:
        model._features_sink = recorded
        try:
            out = model(
                input_ids=input_ids,
                pixel_values=pixel_values,
                attention_mask=attention_mask if attention_mask is not None else torch.ones_like(input_ids),
                shortcut_scales=None if shortcut_scales is None else list(shortcut_scales),
                logits_to_keep=keep,
                output_shortcut_stats=True,
            )
        finally:
            model._features_sink = None
        features = recorded[-1]
        logits = out.logits[:, :-1]  # (B, keep-1, V), at least float32 (the tests run float64)
        log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        targets = input_ids[:, first:]
        picked = log_probs.gather(-1, targets[..., None]).squeeze(-1) * answer_mask[:, first:]  # (B, keep-1)
        logprob = picked.sum(-1)  # (B,)
        high = taps.high_res
        wanted = [features.inputs, features.shortcuts] + ([high] if high is not None else [])
        grads = torch.autograd.grad(logprob.sum(), wanted, allow_unused=True)

    def times_input(x: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        product = torch.zeros_like(x) if grad is None else grad * x
        return product.detach().float().sum(-1).cpu()

    config = model.config
    high_res = None
    if high is not None:
        n_images = features.inputs.shape[0]
        per_token = times_input(high, grads[2])  # (L*n, G, P)
        high_res = per_token.view(len(config.fused_vision_layers), n_images, -1)  # (L, n, G*P)
    return Relevance(
        image=times_input(features.inputs, grads[0]),
        shortcuts=times_input(features.shortcuts, grads[1]),
        high_res=high_res,
        logprob=logprob.detach().float().cpu(),
        fused_layers=list(config.fused_vision_layers),
        vision_layers=list(model.shortcuts.vision_layers),
        patches_per_side=config.patches_per_side,
        high_res_grid=config.high_res_grid,
        stats=out.shortcut_stats,
    )


def relevance_of_answer(
    model: SparseCutForConditionalGeneration,
    prompt_inputs: dict[str, torch.Tensor],
    answer_ids: Sequence[int],
    token: int | None = None,
    shortcut_scales: Sequence[float] | None = None,
) -> Relevance:
    """`answer_relevance` for one prompt (the processor's inputs, batch of 1) and the answer generated after
    it: of the whole answer, or of its `token`-th token alone."""
    if not answer_ids:
        raise ValueError("The answer is empty: there is nothing to attribute.")
    device = model.device
    prompt = prompt_inputs["input_ids"].to(device)
    answer = torch.tensor([list(answer_ids)], dtype=prompt.dtype, device=device)
    input_ids = torch.cat([prompt, answer], dim=1)
    answer_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    if token is None:
        answer_mask[:, prompt.shape[1] :] = True
    else:
        if not 0 <= token < len(answer_ids):
            raise IndexError(f"The answer has {len(answer_ids)} tokens; there is no token {token}.")
        answer_mask[:, prompt.shape[1] + token] = True
    pixel_values = prompt_inputs.get("pixel_values")
    return answer_relevance(
        model,
        input_ids,
        None if pixel_values is None else pixel_values.to(device),
        answer_mask,
        shortcut_scales=shortcut_scales,
    )
