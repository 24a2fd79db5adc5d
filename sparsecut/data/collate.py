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

from ..processing import SparseCutProcessor
from .llava_format import Sample, sample_to_messages

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """One tokenized conversation."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX outside the assistant turns
    image: str | None  # path of its image, loaded at collation
    # Packed conversations (`pack_shared_prefix`): per token, 0 for the shared prefix, k for the k-th branch;
    # a branch sees the prefix and itself only. None: one ordinary causal sequence.
    segments: list[int] | None = None


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
    return truncate(Encoded(input_ids=input_ids, labels=labels, image=sample.image), processor, max_length, sample.id)


def truncate(item: Encoded, processor: SparseCutProcessor, max_length: int | None, name) -> Encoded:
    """`item` cut to `max_length` tokens (None: as it is); refuses to cut through an image."""
    if max_length is None or len(item.input_ids) <= max_length:
        return item
    if processor.image_token_id in item.input_ids[max_length:]:
        raise ValueError(f"Sample {name!r}: {len(item.input_ids)} tokens; cutting to {max_length} would cut its image.")
    segments = None if item.segments is None else item.segments[:max_length]
    return Encoded(item.input_ids[:max_length], item.labels[:max_length], item.image, segments)


def pack_shared_prefix(items: list[Encoded], image_token_id: int) -> Encoded:
    """Conversations about one image packed into one sequence that holds their common prompt prefix once.

    The prefix (system prompt, image tokens: the longest unsupervised run of tokens that all items start with)
    is followed by each item's remainder as a branch; `Collator` lets a branch attend to the prefix and to
    itself only and numbers its positions as if it followed the prefix alone. Each branch is therefore computed
    exactly as its conversation would be on its own, while the image tokens are paid once. Unlike merging the
    records into one multi-turn conversation (`group_by_image`), no answer can be read off an earlier one (a
    ShapesWorld description lists every object: after it, a colour question needs no image).
    """
    if len({item.image for item in items}) != 1:
        raise ValueError("pack_shared_prefix packs conversations about one and the same image.")
    first = items[0]
    shared = min(len(item.input_ids) for item in items) - 1
    for k in range(shared):
        if first.labels[k] != IGNORE_INDEX or any(item.input_ids[k] != first.input_ids[k] for item in items):
            shared = k
            break
    input_ids, labels, segments = first.input_ids[:shared], first.labels[:shared], [0] * shared
    for branch, item in enumerate(items, start=1):
        rest = item.input_ids[shared:]
        if image_token_id in rest:
            raise ValueError("pack_shared_prefix: an image placeholder lies outside the shared prefix.")
        input_ids += rest
        labels += item.labels[shared:]
        segments += [branch] * len(rest)
    return Encoded(input_ids=input_ids, labels=labels, image=first.image, segments=segments)


class ConversationDataset(Dataset):
    """Encodes every sample once up front (fast for ShapesWorld-sized data; tokenizing lazily in workers is the
    change to make for the 665k real mixture)."""

    def __init__(self, samples: list[Sample], processor: SparseCutProcessor, max_length: int | None = None):
        self.items = [encode_sample(sample, processor, max_length) for sample in samples]
        self.samples = samples

    @classmethod
    def packed(cls, groups: list[list[Sample]], processor: SparseCutProcessor, max_length: int | None = None):
        """One item per group of conversations about one image, packed by `pack_shared_prefix` (a group of one
        stays an ordinary sequence); `max_length` applies to the packed sequence."""
        dataset = cls([], processor)
        for group in groups:
            items = [encode_sample(sample, processor) for sample in group]
            item = items[0] if len(items) == 1 else pack_shared_prefix(items, processor.image_token_id)
            dataset.items.append(truncate(item, processor, max_length, "+".join(str(s.id) for s in group)))
            dataset.samples.append(group[0])
        return dataset

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Encoded:
        return self.items[index]


def branch_attention(segments: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4D boolean attention mask (B, 1, T, T) and the position ids (B, T) of packed sequences.

    segments: (B, T), 0 for a shared prefix, k > 0 for branch k (`pack_shared_prefix`); valid: (B, T) False at
    padding. Causal; a branch token attends to the prefix and its own branch; a branch's positions continue
    from the end of the prefix. Padding attends to itself only (a row with nothing to attend to gives NaN).
    """
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same_branch = (segments[:, :, None] == segments[:, None, :]) & causal
    mask = (same_branch | (causal & (segments[:, None, :] == 0))) & valid[:, None, :] & valid[:, :, None]
    mask |= torch.eye(length, dtype=torch.bool)
    prefix = ((segments == 0) & valid).sum(-1, keepdim=True)
    index = torch.arange(length).expand_as(segments)
    # Position within the branch: the number of earlier tokens of the same branch.
    positions = torch.where(segments == 0, index, prefix + same_branch.sum(-1) - 1)
    return mask[:, None], positions * valid


class Collator:
    """Right-pads a list of `Encoded` into a batch and preprocesses the images (in sample order). Packed items
    (`pack_shared_prefix`) make it return a 4D attention mask and position ids (`branch_attention`)."""

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
        if any(item.segments is not None for item in items):
            segments = torch.zeros((len(items), length), dtype=torch.long)
            for row, item in enumerate(items):
                if item.segments is not None:
                    segments[row, : len(item.segments)] = torch.tensor(item.segments)
            batch["attention_mask"], batch["position_ids"] = branch_attention(segments, attention_mask.bool())
        images = [item.image for item in items if item.image is not None]
        if images:
            batch["pixel_values"] = self.processor.preprocess_images(images)
        return batch
