"""LoRA adapters that act only on conversations with an image (`SparseCutConfig.lora_needs_image`)."""

import pytest
import torch
from conftest import image_question, random_image

from sparsecut.testing import tiny_model

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}


def with_trained_adapters(lora_needs_image: bool):
    """A tiny model whose LoRA B matrices are random (peft starts them at zero, which would hide any effect)."""
    model, processor = tiny_model(lora=LORA, lora_needs_image=lora_needs_image)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model, processor


def zero_adapters(model) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.zero_()


def inputs_for(processor, image):
    return processor.apply_chat_template(
        image_question(image, "What is there?"), add_generation_prompt=True, tokenize=True, return_dict=True
    )


@torch.no_grad()
def test_text_only_answers_come_from_the_base_llm_and_image_answers_use_the_adapters():
    model, processor = with_trained_adapters(lora_needs_image=True)
    text, image = inputs_for(processor, None), inputs_for(processor, random_image(3))
    gated_text, gated_image = model(**text).logits, model(**image).logits
    zero_adapters(model)  # now the model is its base LLM plus the vision side
    torch.testing.assert_close(gated_text, model(**text).logits, rtol=0, atol=0)
    assert not torch.allclose(gated_image, model(**image).logits, atol=1e-3)


@torch.no_grad()
def test_without_the_switch_the_adapters_change_text_only_answers():
    model, processor = with_trained_adapters(lora_needs_image=False)
    text = inputs_for(processor, None)
    adapted = model(**text).logits
    zero_adapters(model)
    assert not torch.allclose(adapted, model(**text).logits, atol=1e-3)


@pytest.mark.parametrize("with_image", [True, False])
@torch.no_grad()
def test_decode_steps_keep_the_prefills_choice(with_image):
    # A decode step holds one new token and no image; it must run as its prefill did, so cached generation
    # equals generation that re-reads the whole sequence at every step. Alternate the two kinds of conversation
    # so that each generation starts from the other kind's state.
    model, processor = with_trained_adapters(lora_needs_image=True)
    inputs = inputs_for(processor, random_image(4) if with_image else None)
    other = inputs_for(processor, None if with_image else random_image(4))
    model(**other)
    cached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True)
    model(**other)
    uncached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_the_switch_is_saved_and_validated(tmp_path):
    model, _ = with_trained_adapters(lora_needs_image=True)
    model.save_pretrained(tmp_path)
    from sparsecut import SparseCutConfig

    assert SparseCutConfig.from_pretrained(tmp_path).lora_needs_image is True
    with pytest.raises(ValueError, match="lora_needs_image"):
        SparseCutConfig(
            vision_config=model.config.vision_config, text_config=model.config.text_config, lora_needs_image="yes"
        )


# --- merged adapters on inference loads (`load_model(merge_adapters=True)`, the default) ---------------------
def saved_with_adapters(tmp_path, lora_needs_image: bool):
    model, processor = with_trained_adapters(lora_needs_image)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    return model, processor


def has_peft_layers(model) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_an_inference_load_merges_the_adapters_and_text_only_answers_stay_the_base_llms(tmp_path, dtype):
    from sparsecut import load_model

    saved_with_adapters(tmp_path, lora_needs_image=True)
    unmerged, processor = load_model(tmp_path, device="cpu", dtype=dtype, merge_adapters=False)
    merged, _ = load_model(tmp_path, device="cpu", dtype=dtype)
    assert has_peft_layers(unmerged) and not has_peft_layers(merged)
    text, image = inputs_for(processor, None), inputs_for(processor, random_image(3))
    # Image conversations: the merged weights give what the adapters give, up to rounding.
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(merged(**image).logits, unmerged(**image).logits, rtol=tolerance, atol=tolerance)
    # Text-only conversations run on the base weights, bit for bit, before and after an image conversation.
    reference = unmerged(**text).logits
    torch.testing.assert_close(merged(**text).logits, reference, rtol=0, atol=0)
    merged(**image)
    torch.testing.assert_close(merged(**text).logits, reference, rtol=0, atol=0)
    zero_adapters(unmerged)
    torch.testing.assert_close(merged(**text).logits, unmerged(**text).logits, rtol=0, atol=0)


@torch.no_grad()
def test_merged_generation_gives_the_adapters_tokens_and_alternates_cleanly(tmp_path):
    from sparsecut import load_model

    saved_with_adapters(tmp_path, lora_needs_image=True)
    unmerged, processor = load_model(tmp_path, device="cpu", merge_adapters=False)
    merged, _ = load_model(tmp_path, device="cpu")
    conversations = [inputs_for(processor, random_image(4)), inputs_for(processor, None)] * 2
    for inputs in conversations:  # image, text, image, text: every switch goes both ways
        expected = unmerged.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert merged.generate(**inputs, max_new_tokens=8, do_sample=False).tolist() == expected.tolist()


@torch.no_grad()
def test_without_the_image_switch_the_merge_keeps_no_second_copy(tmp_path):
    from sparsecut import load_model

    saved_with_adapters(tmp_path, lora_needs_image=False)
    unmerged, processor = load_model(tmp_path, device="cpu", merge_adapters=False)
    merged, _ = load_model(tmp_path, device="cpu")
    assert not has_peft_layers(merged)
    assert not any("inactive" in name for name, _ in merged.named_buffers())
    assert not any("inactive" in key for key in merged.state_dict())
    text = inputs_for(processor, None)
    torch.testing.assert_close(merged(**text).logits, unmerged(**text).logits, rtol=1e-4, atol=1e-4)
