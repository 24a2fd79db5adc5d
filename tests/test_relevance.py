"""Answer relevance (gradient x input of log p(answer)) on tiny random models: exact zeros where nothing can reach
the answer, agreement with finite differences, batching, per-token scores and quantized loading."""

import pytest
import torch
from conftest import image_question, random_image

from sparsecut import build, load_model
from sparsecut.inspection.relevance import answer_relevance, relevance_of_answer
from sparsecut.testing import tiny_model, tiny_text_config, tiny_vision_config
from sparsecut.tokenization import byte_tokenizer

FUSIONS = ["concat_mlp", "cross_attention", "none"]
ANSWER = [70, 71, 72]  # "FGH" in the byte tokenizer


def prompt_inputs(processor, seed: int = 1, question: str = "What is it?") -> dict:
    return dict(
        processor.apply_chat_template(
            image_question(random_image(seed), question), add_generation_prompt=True, tokenize=True, return_dict=True
        )
    )


def with_answer(inputs: dict, answer=ANSWER) -> tuple[torch.Tensor, torch.Tensor]:
    prompt = inputs["input_ids"]
    input_ids = torch.cat([prompt, torch.tensor([answer])], dim=1)
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    mask[:, prompt.shape[1] :] = True
    return input_ids, mask


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_gives_relevance_of_the_expected_shapes(fusion):
    model, processor = tiny_model(fusion=fusion)
    relevance = relevance_of_answer(model, prompt_inputs(processor), ANSWER)
    side, grid, k = model.config.patches_per_side, model.config.high_res_grid, model.config.num_shortcuts
    assert relevance.image.shape == (1, side * side)
    assert relevance.shortcuts.shape == (k, 1, side * side)
    assert relevance.low_res_map().shape == (side, side)
    if fusion == "none":  # the fusion reads the low-res view only
        assert relevance.high_res is None and relevance.high_res_map() is None
    else:
        assert relevance.high_res.shape == (len(model.config.fused_vision_layers), 1, grid * grid * side * side)
        assert relevance.high_res_map().shape == (grid * side, grid * side)
        assert relevance.high_res.abs().sum() > 0
    assert relevance.image.abs().sum() > 0 and relevance.shortcuts.abs().sum() > 0
    assert relevance.stats is not None  # the same forward pass also gives the shortcut stats
    assert all(p.grad is None for p in model.parameters())  # gradients of activations only, never weights


@pytest.mark.parametrize("fusion", FUSIONS)
def test_an_image_the_answer_cannot_see_gets_exactly_zero_relevance(fusion):
    model, processor = tiny_model(fusion=fusion)
    inputs = prompt_inputs(processor)
    input_ids, answer_mask = with_answer(inputs)
    masked = (input_ids != model.config.image_token_id).long()  # no later token may attend to the image
    relevance = answer_relevance(model, input_ids, inputs["pixel_values"], answer_mask, attention_mask=masked)
    assert torch.count_nonzero(relevance.image) == 0
    assert torch.count_nonzero(relevance.shortcuts) == 0
    if relevance.high_res is not None:
        assert torch.count_nonzero(relevance.high_res) == 0
    seen = answer_relevance(model, input_ids, inputs["pixel_values"], answer_mask)
    assert torch.count_nonzero(seen.image) > 0  # ... while the same image, visible, counts


class _Nudge(list):
    """A features sink that moves one token of the image features along itself: x_t -> (1 + eps) x_t."""

    def __init__(self, where: str, token: int, eps: float):
        super().__init__()
        self.where, self.token, self.eps = where, token, eps

    def append(self, features) -> None:
        target = features.inputs[0] if self.where == "image" else features.shortcuts[0, 0]
        target[self.token] += self.eps * target[self.token].clone()
        super().append(features)


def logprob(model, input_ids, pixel_values, answer_mask) -> float:
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits[0, :-1].double()
    targets = input_ids[0, 1:]
    scores = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    return float(scores[answer_mask[0, 1:]].sum())


def nudged_logprob(model, where, token, eps, *args) -> float:
    if where == "high_res":

        def scale(module, inputs, output):
            if output.ndim == 4:  # the high-res crops (N, G, P, d); the low-res call is (N, P, d)
                output = output.clone()
                output.view(output.shape[0], -1, output.shape[-1])[0, token] *= 1 + eps
            return output

        handle = model.fusion.input_norm.register_forward_hook(scale)
        try:
            return logprob(model, *args)
        finally:
            handle.remove()
    model._features_sink = _Nudge(where, token, eps)
    try:
        return logprob(model, *args)
    finally:
        model._features_sink = None


@pytest.mark.parametrize("fusion", ["concat_mlp", "cross_attention"])
def test_relevance_equals_a_finite_difference_along_each_token(fusion):
    model, processor = tiny_model(fusion=fusion)
    for layer in model.fusion.modules():  # a fusion that matters: its high-res share well above rounding
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=0.1)
    model.double()
    inputs = prompt_inputs(processor)
    input_ids, answer_mask = with_answer(inputs)
    pixel_values = inputs["pixel_values"].double()
    relevance = answer_relevance(model, input_ids, pixel_values, answer_mask)
    # A central difference along x_t itself. Some LLM norms compute in float32 even in a float64 model, so the step
    # is not tiny: eps = 0.03 keeps rounding and the second-order term both under 0.5 %.
    eps = 0.03
    cases = [
        ("image", relevance.image[0]),
        ("shortcut", relevance.shortcuts[0, 0]),
        ("high_res", relevance.high_res[0, 0]),
    ]
    for where, scores in cases:
        for token in scores.abs().topk(3).indices.tolist():
            plus = nudged_logprob(model, where, token, eps, input_ids, pixel_values, answer_mask)
            minus = nudged_logprob(model, where, token, -eps, input_ids, pixel_values, answer_mask)
            estimate = (plus - minus) / (2 * eps)
            assert estimate == pytest.approx(float(scores[token]), rel=5e-3), (where, token)


def test_batching_does_not_change_any_samples_relevance():
    model, processor = tiny_model(fusion="concat_mlp")
    first, second = prompt_inputs(processor, seed=1), prompt_inputs(processor, seed=2)
    (ids_a, mask_a), (ids_b, mask_b) = with_answer(first, [70, 71, 72]), with_answer(second, [80, 81, 82])
    alone = [
        answer_relevance(model, ids_a, first["pixel_values"], mask_a),
        answer_relevance(model, ids_b, second["pixel_values"], mask_b),
    ]
    pixels = torch.cat([first["pixel_values"], second["pixel_values"]])
    together = answer_relevance(model, torch.cat([ids_a, ids_b]), pixels, torch.cat([mask_a, mask_b]))
    for i, single in enumerate(alone):
        torch.testing.assert_close(together.image[i], single.image[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(together.shortcuts[:, i], single.shortcuts[:, 0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(together.high_res[:, i], single.high_res[:, 0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(together.logprob[i], single.logprob[0], rtol=1e-5, atol=1e-6)


def test_the_answers_relevance_is_the_sum_of_its_tokens_relevance():
    model, processor = tiny_model(fusion="cross_attention")
    inputs = prompt_inputs(processor)
    whole = relevance_of_answer(model, inputs, ANSWER)
    tokens = [relevance_of_answer(model, inputs, ANSWER, token=t) for t in range(len(ANSWER))]
    torch.testing.assert_close(sum(t.image for t in tokens), whole.image, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sum(t.high_res for t in tokens), whole.high_res, rtol=1e-4, atol=1e-6)
    with pytest.raises(IndexError, match="has 3 tokens"):
        relevance_of_answer(model, inputs, ANSWER, token=3)


def test_a_prompt_without_an_image_or_an_empty_answer_is_refused():
    model, processor = tiny_model()
    inputs = dict(
        processor.apply_chat_template(
            image_question(None, "Hi?"), add_generation_prompt=True, tokenize=True, return_dict=True
        )
    )
    with pytest.raises(ValueError, match="needs an image"):
        relevance_of_answer(model, inputs, ANSWER)
    with pytest.raises(ValueError, match="empty"):
        relevance_of_answer(model, prompt_inputs(processor), [])


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_relevance_works_under_quantized_loading_and_stays_close_to_full_precision(tmp_path, quantization):
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    # bitsandbytes' CPU 4-bit kernels need input widths of at least one 64-wide block.
    model, processor = build(
        vision=tiny_vision_config("clip", hidden_size=64, intermediate_size=128),
        llm=tiny_text_config("llama", hidden_size=64, intermediate_size=128),
        tokenizer=byte_tokenizer(),
        fusion="concat_mlp",
        shortcut_gate_init=0.5,
    )
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    quantized, quantized_processor = load_model(tmp_path, quantization=quantization, device="cpu")
    reference = relevance_of_answer(model.eval(), prompt_inputs(processor), ANSWER)
    relevance = relevance_of_answer(quantized, prompt_inputs(quantized_processor), ANSWER)
    for got, want in [(relevance.image, reference.image), (relevance.high_res, reference.high_res)]:
        assert torch.isfinite(got).all() and got.abs().sum() > 0
        assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.5
