"""Does the model still speak as its base LLM when there is no image? Text-only answers against the base's.

An MLLM fine-tuned on one task can carry that task into every answer ("Write a haiku about the sea." -> a
list of shapes). `compare_with_base` asks the SparseCut model and its base LLM the same text-only prompts
(rendered by the same chat template), and reports how often their greedy answers are equal and the mean
per-token KL divergence KL(base || model) over the base's answer tokens (teacher-forced through both).

`PROMPTS` are prompts of every kind a user types (questions, instructions, arithmetic, translation,
writing); no model is trained on them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

PROMPTS = (
    # questions
    "What is the capital of France?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in our solar system?",
    "Why is the sky blue?",
    "What do bees make?",
    "How many days are in a week?",
    "What is photosynthesis?",
    "Which ocean is the largest?",
    "What language is spoken in Brazil?",
    "What is the boiling point of water?",
    "Who painted the Mona Lisa?",
    "What is the opposite of hot?",
    "Where do penguins live?",
    "What is a noun?",
    "How many legs does a spider have?",
    # instructions
    "Give me three tips for sleeping better.",
    "List four fruits that are red.",
    "Explain what a computer is.",
    "Suggest a name for a pet goldfish.",
    "Tell me a fun fact about octopuses.",
    "Summarise the story of Cinderella.",
    "Give me a synonym for happy.",
    "How do I boil an egg?",
    "Name three colours of the rainbow.",
    "What should I pack for a day at the beach?",
    "Describe a rainy day.",
    "Recommend a book for a child.",
    # arithmetic
    "What is 7 times 8?",
    "What is 15 plus 27?",
    "What is 100 minus 37?",
    "What is half of 50?",
    "What is 9 squared?",
    "If I have 3 apples and eat one, how many are left?",
    "What is 12 divided by 4?",
    "Count from one to five.",
    "What is 2 + 2?",
    # translation
    "Translate 'good morning' into French.",
    "How do you say 'thank you' in Spanish?",
    "Translate 'cat' into German.",
    "What does 'bonjour' mean?",
    "Translate 'I love books' into Italian.",
    "How do you say 'hello' in Japanese?",
    # writing
    "Write a haiku about the sea.",
    "Write a sentence about a cat.",
    "Write a short poem about autumn.",
    "Write a two-sentence story about a robot.",
    "Write a birthday message for my friend.",
    "Write a slogan for a bakery.",
    "Write a limerick about a frog.",
    "Describe the moon in one sentence.",
    "Write a short thank-you note to a teacher.",
    "Invent a name for a new ice cream flavour.",
    # chit-chat
    "Hello! How are you?",
    "What can you do?",
    "Tell me a joke.",
    "What is your favourite season and why?",
    "Can you help me plan a picnic?",
    "Good night!",
)


def _render(processor, prompt: str) -> dict:
    messages = [[{"role": "user", "content": [{"type": "text", "text": prompt}]}]]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)


@torch.no_grad()
def compare_with_base(model, processor, base_llm, prompts=PROMPTS, max_new_tokens: int = 48) -> dict:
    """Greedy text-only answers of `model` (a SparseCut model) and `base_llm` (its LLM without any training,
    e.g. `sparsecut.build.load_llm(model.config.base_llm)[0]`) to each prompt. Returns {"n", "equal" (share
    of prompts with identical answers), "mean_kl" (nats per answer token), "answers": [{prompt, model, base,
    equal, kl}]}."""
    rows, kl_sum, kl_tokens = [], 0.0, 0
    eos = processor.tokenizer.eos_token_id
    for prompt in tqdm(prompts, desc="text-only", unit="prompt"):
        inputs = _render(processor, prompt)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        mine = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1] :]
        theirs = base_llm.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=eos
        )[0, ids.shape[1] :]
        # KL over the base's answer, teacher-forced through both: how far the model's next-token
        # distributions are from the base's where the base speaks.
        full = torch.cat([ids[0], theirs]).unsqueeze(0)
        answer_positions = slice(ids.shape[1] - 1, full.shape[1] - 1)
        base_logp = F.log_softmax(base_llm(input_ids=full).logits[0, answer_positions].float(), -1)
        model_logp = F.log_softmax(model(input_ids=full).logits[0, answer_positions].float(), -1)
        kl = F.kl_div(model_logp, base_logp, log_target=True, reduction="none").sum(-1)  # (answer tokens,)
        kl_sum, kl_tokens = kl_sum + float(kl.sum()), kl_tokens + kl.numel()
        decode = processor.tokenizer.decode
        row = {
            "prompt": prompt,
            "model": decode(mine, skip_special_tokens=True).strip(),
            "base": decode(theirs, skip_special_tokens=True).strip(),
            "kl": float(kl.mean()),
        }
        row["equal"] = row["model"] == row["base"]
        rows.append(row)
    return {
        "n": len(rows),
        "equal": sum(r["equal"] for r in rows) / max(1, len(rows)),
        "mean_kl": kl_sum / max(1, kl_tokens),
        "answers": rows,
    }


def text_only(model: str | None = None, out_dir: str | None = None, max_new_tokens: int = 48) -> dict:
    """Command-line entry point: compare a checkpoint (None: the default model) with its base LLM on `PROMPTS`;
    writes text_only.json (every answer) to `out_dir` if given. The checkpoint must name its base LLM."""
    from ..build import load_llm, load_model

    loaded, processor = load_model(model, device="cpu")
    if not loaded.config.base_llm:
        raise ValueError("This checkpoint contains its whole LLM and names no base LLM to compare with.")
    base, _ = load_llm(loaded.config.base_llm)
    result = compare_with_base(loaded, processor, base.eval(), PROMPTS, max_new_tokens)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "text_only.json").write_text(json.dumps(result, indent=2))
    return result
