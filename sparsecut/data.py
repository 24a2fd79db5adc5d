"""Training data: LLaVA-format conversations -> token ids with answer-only labels, and batches.

Implements the LLaVA-1.5 protocol's supervision (method note, "Parts" 5): the loss is taken on the assistant
turns only (their text and the end-of-turn token), never on the prompt, the image tokens or padding. The
conversation is rendered with the LLM's own chat template, and the rendered text is cut at the assistant
turns' boundaries and tokenized piece by piece, so labels line up with tokens exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from .llava_format import Sample, sample_to_messages
from .processing import SparseCutProcessor

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """One tokenized conversation."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX outside the assistant turns
    image: str | None  # path of its image, loaded at collation


def assistant_spans(processor: SparseCutProcessor, rendered: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The fully rendered conversation and the character spans of its assistant turns.

    A turn's span runs from the end of the prompt that asks for it (`add_generation_prompt=True`) to the end of
    the conversation rendered through it, so it covers the answer and the template's end-of-turn marker.
    """
    template = processor.tokenizer.apply_chat_template
    full = template(rendered, tokenize=False)
    spans = []
    for index, message in enumerate(rendered):
        if message["role"] != "assistant":
            continue
        prompt = template(rendered[:index], tokenize=False, add_generation_prompt=True)
        through = template(rendered[: index + 1], tokenize=False)
        if not (through.startswith(prompt) and full.startswith(through)):
            raise ValueError("The chat template does not render conversations prefix-stably; cannot place labels.")
        spans.append((len(prompt), len(through)))
    return full, spans


def encode_sample(sample: Sample, processor: SparseCutProcessor, max_length: int | None = None) -> Encoded:
    """Tokenize a conversation with labels on its assistant turns; image placeholders become image tokens."""
    rendered, _ = processor.render_messages(sample_to_messages(sample))
    text, spans = assistant_spans(processor, rendered)
    expand = processor.num_image_tokens
    input_ids, labels, cursor = [], [], 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, supervised in ((text[cursor:start], False), (text[start:end], True)):
            if not piece:
                continue
            piece = piece.replace(processor.image_token, processor.image_token * expand)
            ids = processor.tokenizer(piece, add_special_tokens=False)["input_ids"]
            input_ids += ids
            labels += ids if supervised else [IGNORE_INDEX] * len(ids)
        cursor = end
    if max_length is not None and len(input_ids) > max_length:
        if processor.image_token_id in input_ids[max_length:]:
            raise ValueError(
                f"Sample {sample.id!r}: {len(input_ids)} tokens; cutting to {max_length} would cut its image."
            )
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return Encoded(input_ids=input_ids, labels=labels, image=sample.image)


class ConversationDataset(Dataset):
    """Encodes every sample once up front (fast for ShapesWorld-sized data; tokenizing lazily in workers is the
    change to make for the 665k real mixture)."""

    def __init__(self, samples: list[Sample], processor: SparseCutProcessor, max_length: int | None = None):
        self.items = [encode_sample(sample, processor, max_length) for sample in samples]
        self.samples = samples

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Encoded:
        return self.items[index]


class Collator:
    """Right-pads a list of `Encoded` into a batch and preprocesses the images (in sample order)."""

    def __init__(self, processor: SparseCutProcessor):
        self.processor = processor
        self.pad_id = processor.tokenizer.pad_token_id

    def __call__(self, items: list[Encoded]) -> dict[str, torch.Tensor]:
        length = max(len(item.input_ids) for item in items)
        input_ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item.input_ids)
            input_ids[row, :n] = torch.tensor(item.input_ids)
            labels[row, :n] = torch.tensor(item.labels)
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        images = [item.image for item in items if item.image is not None]
        if images:
            batch["pixel_values"] = self.processor.preprocess_images(images)
        return batch
