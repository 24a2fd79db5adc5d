"""Evaluation: `sparsecut eval MODEL --data test.json` answers every question greedily and scores the answers
per question family (exact match after normalisation; yes/no accuracy and F1; description precision/recall),
writing JSON and a markdown table."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..build import load_model
from ..data.llava_format import load_llava_json, sample_to_messages
from .metrics import score, to_markdown


@torch.no_grad()
def predict(
    model, processor, samples, batch_size: int = 16, max_new_tokens: int = 64, input_lengths: list | None = None
) -> list[str]:
    """Greedy answers to each sample's first question (its first assistant turn is the reference). The LLM
    input length of each prompt (text and image tokens) is appended to `input_lengths` if one is given, in the
    order the prompts were batched (by family), not the samples' order."""
    # A batch generates until its longest answer ends: questions of one family (answers of similar lengths)
    # are batched together, then the answers are put back in the samples' order.
    order = sorted(range(len(samples)), key=lambda i: str(samples[i].meta.get("family", "")))
    answers = []
    for start in tqdm(range(0, len(samples), batch_size), desc="eval", unit="batch"):
        chunk = [samples[i] for i in order[start : start + batch_size]]
        conversations = [sample_to_messages(sample)[:1] for sample in chunk]
        images = [[sample.image] if sample.image else [] for sample in chunk]
        inputs = processor.apply_chat_template(
            conversations,
            images=images if any(images) else None,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            padding_side="left",
        ).to(model.device)
        if input_lengths is not None:
            input_lengths += inputs["attention_mask"].sum(-1).tolist()
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers += processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    in_order = [""] * len(samples)
    for index, answer in zip(order, answers):
        in_order[index] = answer.strip()
    return in_order


def evaluate(
    model: str | None,
    data: str,
    out_dir: str | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "auto",
    quantization: str | None = None,
    max_new_tokens: int = 128,
    families: list[str] | None = None,
    high_res_overlap: bool | None = None,
) -> dict:
    """Score a model on a LLaVA-format test file whose records carry a `family`; writes scores.json, scores.md
    and predictions.jsonl under `out_dir` (default: next to the data). `families` keeps only those question
    families; `limit` then takes the first that-many questions; `high_res_overlap` overrides the checkpoint's
    (`load_model`). The scores also give the image tokens per image and the mean LLM input tokens per question."""
    loaded, processor = load_model(model, quantization=quantization, device=device, high_res_overlap=high_res_overlap)
    samples = load_llava_json(data, image_root=str(Path(data).parent))
    if families is not None:
        samples = [sample for sample in samples if sample.meta.get("family") in families]
    samples = samples[:limit]
    lengths: list[int] = []
    predictions = predict(loaded, processor, samples, batch_size, max_new_tokens, input_lengths=lengths)
    records = [
        {"id": s.id, "family": s.meta.get("family", "other"), "prediction": p, "answer": s.turns[1][1]}
        | {key: s.meta[key] for key in ("form", "short") if key in s.meta}  # asked for a sentence, a reason, ...
        for s, p in zip(samples, predictions)
    ]
    scores = score(records)
    scores["image_tokens"] = loaded.config.num_image_tokens
    scores["llm_input_tokens"] = sum(lengths) / max(1, len(lengths))
    out = Path(out_dir) if out_dir else Path(data).parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "scores.json").write_text(json.dumps(scores, indent=2))
    (out / "scores.md").write_text(to_markdown(scores))
    with (out / "predictions.jsonl").open("w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    return scores
