"""Evaluation: `sparsecut eval MODEL --data test.json` answers every question greedily and scores the answers
per question family (exact match after normalisation; yes/no accuracy and F1; description precision/recall),
writing JSON and a markdown table."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .build import load_model
from .llava_format import load_llava_json, sample_to_messages
from .metrics import score, to_markdown


@torch.no_grad()
def predict(model, processor, samples, batch_size: int = 16, max_new_tokens: int = 64) -> list[str]:
    """Greedy answers to each sample's first question (its first assistant turn is the reference)."""
    answers = []
    for start in tqdm(range(0, len(samples), batch_size), desc="eval", unit="batch"):
        conversations = [sample_to_messages(sample)[:1] for sample in samples[start : start + batch_size]]
        inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, padding_side="left").to(model.device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers += processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [answer.strip() for answer in answers]


def evaluate(
    model: str | None,
    data: str,
    out_dir: str | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "auto",
    quantization: str | None = None,
) -> dict:
    """Score a model on a LLaVA-format test file whose records carry a `family`; writes scores.json, scores.md
    and predictions.jsonl under `out_dir` (default: next to the data)."""
    loaded, processor = load_model(model, quantization=quantization, device=device)
    samples = load_llava_json(data, image_root=str(Path(data).parent))[:limit]
    predictions = predict(loaded, processor, samples, batch_size)
    records = [
        {"id": s.id, "family": s.meta.get("family", "other"), "prediction": p, "answer": s.turns[1][1]}
        for s, p in zip(samples, predictions)
    ]
    scores = score(records)
    out = Path(out_dir) if out_dir else Path(data).parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "scores.json").write_text(json.dumps(scores, indent=2))
    (out / "scores.md").write_text(to_markdown(scores))
    with (out / "predictions.jsonl").open("w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    return scores
