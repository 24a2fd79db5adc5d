"""The CUDA paths: bitsandbytes 8-bit / 4-bit loading, bf16 generation, shortcut statistics and the demo's
out-of-memory handling on a real GPU.

Every test here is marked `cuda` and skips on a machine without a CUDA GPU (tests/conftest.py);
`python scripts/gpu_check.py` runs them on a GPU machine together with the app and the bench.
"""

from contextlib import closing

import pytest
import torch
from conftest import image_question, random_image

from demo.engine import ChatEngine, ChatSession, GenerationSettings, error_message
from demo.examples import load_examples
from sparsecut import load_model
from sparsecut.build import DEFAULT_WEIGHTS
from sparsecut.testing import tiny_model

pytestmark = pytest.mark.cuda

BF16_LOGIT_TOLERANCE = 0.05  # bf16 keeps 8 bits of mantissa: cached and uncached kernels round differently
FAMILIES = ("colour", "shape", "count", "pattern")  # the CPU check of the default model asks the same


def greedy(model, processor, image, question: str, max_new_tokens: int = 16, **kwargs) -> torch.Tensor:
    inputs = processor.apply_chat_template(
        image_question(image, question), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    inputs = {name: value.to(model.device) for name, value in inputs.items()}
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return out[0, inputs["input_ids"].shape[1] :]


@pytest.mark.skipif(not (DEFAULT_WEIGHTS / "config.json").is_file(), reason="the default model is not in weights/")
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_the_default_model_loads_quantized_on_cuda_and_answers_the_examples(quantization):
    import bitsandbytes as bnb
    from PIL import Image

    model, processor = load_model(quantization=quantization, device="cuda")
    kind = bnb.nn.Linear4bit if quantization == "4bit" else bnb.nn.Linear8bitLt
    assert any(isinstance(module, kind) for module in model.language_model.modules())
    assert model.device.type == "cuda"
    examples = [e for e in load_examples() if e.family in FAMILIES]
    replies = [
        processor.decode(
            greedy(model, processor, Image.open(e.image).convert("RGB"), e.question), skip_special_tokens=True
        )
        for e in examples
    ]
    right = [e.answer.lower() in reply.lower() for e, reply in zip(examples, replies)]
    assert sum(right) >= len(examples) - 1, list(zip([e.question for e in examples], replies))


def test_cached_and_uncached_generation_agree_in_bf16_on_cuda():
    model, processor = tiny_model()
    model.to("cuda", torch.bfloat16)
    image = random_image(0)
    cached = greedy(model, processor, image, "What is this?", max_new_tokens=12, use_cache=True)
    uncached = greedy(model, processor, image, "What is this?", max_new_tokens=12, use_cache=False)
    # Greedy tokens may only part where the top two logits are closer than bf16's rounding.
    inputs = processor.apply_chat_template(
        image_question(image, "What is this?"), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    prompt = inputs["input_ids"].shape[1]
    sequence = torch.cat([inputs["input_ids"].to("cuda"), cached[None]], dim=1)
    with torch.inference_mode():
        logits = (
            model(
                input_ids=sequence,
                attention_mask=torch.ones_like(sequence),
                pixel_values=inputs["pixel_values"].to("cuda", torch.bfloat16),
            )
            .logits[0, prompt - 1 : -1]
            .float()
        )  # (new tokens, vocab): the uncached logits behind each cached token
    top2 = logits.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * BF16_LOGIT_TOLERANCE
    chosen = logits.gather(-1, cached[:, None]).squeeze(-1)
    assert torch.all(chosen >= top2[:, 0] - BF16_LOGIT_TOLERANCE), "a cached token is not the uncached argmax"
    first_tie = int(torch.nonzero(~decided)[0]) if not decided.all() else len(cached)
    assert torch.equal(cached[:first_tie], uncached[:first_tie])


def test_shortcut_statistics_on_cuda_equal_those_on_the_cpu():
    model, processor = tiny_model()
    inputs = processor.apply_chat_template(
        image_question(random_image(1), "Describe."), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    recorded = {}
    for device in ("cpu", "cuda"):
        model.to(device)
        with torch.inference_mode(), model.record_stats() as stats:
            model(**{name: value.to(device) for name, value in inputs.items()})
        recorded[device] = stats.last
    cpu, cuda = recorded["cpu"], recorded["cuda"]
    assert cuda.ratios.device.type == "cpu"  # the statistics always come back to the CPU for plotting
    torch.testing.assert_close(cuda.ratios, cpu.ratios, rtol=1e-3, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(cuda.fusion_attention, cpu.fusion_attention, rtol=1e-3, atol=1e-5)


def test_a_real_cuda_out_of_memory_is_reported_and_the_next_request_is_served(monkeypatch):
    model, processor = tiny_model()
    engine = ChatEngine(model.to("cuda"), processor, max_new_tokens=8)
    generate, calls = model.generate, []
    card = torch.cuda.get_device_properties(model.device).total_memory

    def past_the_card(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            torch.empty(2 * card, dtype=torch.uint8, device=model.device)  # a real CUDA allocation failure
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", past_the_card)
    session, settings = ChatSession(), GenerationSettings(max_new_tokens=8)
    with closing(session.ask(engine, "What is this?", random_image(2), settings)) as turns:
        failed = list(turns)[-1]
    assert failed.status == "failed" and failed.error == error_message(torch.OutOfMemoryError())
    with closing(session.ask(engine, "And now?", random_image(3), settings)) as turns:
        served = list(turns)[-1]
    assert served.status == "done" and session.last_answer is not None
    assert session.last_answer.cost.memory_kind == "peak CUDA memory allocated"


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_a_converted_tiny_llava_loads_quantized_on_cuda_and_stays_close_to_llava(quantization, tmp_path):
    from sparsecut.convert import convert
    from sparsecut.testing import tiny_llava

    tiny_llava(tmp_path / "llava", "llama", "clip")
    out = convert(str(tmp_path / "llava"), tmp_path / "sparsecut", fusion="concat_mlp", schedule="uniform:2")
    model, processor = load_model(out, quantization=quantization, device="cuda")
    full, _ = load_model(out, device="cuda", dtype=torch.float32)
    inputs = processor.apply_chat_template(
        image_question(random_image(4), "What is this?"), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    inputs = {name: value.to("cuda") for name, value in inputs.items()}
    with torch.inference_mode():
        quantized, exact = model(**inputs).logits.float(), full(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 6
    assert torch.isfinite(quantized).all()
    # Quantization moves the logits (nf4 more than int8) but keeps them correlated with the exact model's.
    correlation = torch.corrcoef(torch.stack([quantized.flatten(), exact.flatten()]))[0, 1]
    assert correlation > (0.9 if quantization == "8bit" else 0.7)
