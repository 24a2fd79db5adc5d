"""Reading and writing the LLaVA conversation JSON format.

This is the format of LLaVA-Pretrain (`blip_laion_cc_sbu_558k.json`), LLaVA-1.5 instruction tuning
(`llava_v1_5_mix665k.json`) and of the ShapesWorld export: a JSON list of records such as

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is the bus doing?"},
                       {"from": "gpt", "value": "It is parked."}, ...]}

`image` is absent for text-only records. Turns alternate human/gpt, starting with human, and when there
is an image its `<image>` placeholder appears exactly once, in the first human turn, before or after the
text. Other keys (mix665k's "model", ShapesWorld's "family") are kept in `Sample.meta` untouched.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
_ROLES = {"human": "user", "gpt": "assistant"}
_FROM = {v: k for k, v in _ROLES.items()}


@dataclass
class Sample:
    """One conversation, optionally about one image."""

    id: str | int
    """The record id, with its original type (the real files use strings; some tools write ints)."""
    image: str | None
    """Image path (relative to the image root unless one was given when loading); None if text-only."""
    turns: list[tuple[str, str]]
    """(role, text) pairs, role "user" or "assistant"; texts keep the `<image>` placeholder as written."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Any other keys of the record, kept so that saving writes them back."""


def _parse_record(record: Any, index: int, image_root: str | None) -> Sample:
    if not isinstance(record, dict):
        raise ValueError(f"record #{index}: expected a JSON object, got {type(record).__name__}")
    rid = record.get("id", f"#{index}")

    def fail(problem: str) -> ValueError:
        return ValueError(f"record {rid!r}: {problem}")

    if "id" not in record:
        raise fail("missing 'id'")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise fail(f"'id' must be a string or an integer, got {type(rid).__name__}")
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise fail(f"'image' must be a non-empty string (one image per record), got {image!r}")
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise fail("missing or empty 'conversations'")
    if len(conversations) % 2:
        raise fail(f"{len(conversations)} turns: expected human/gpt pairs, ending with a gpt turn")

    turns = []
    for t, turn in enumerate(conversations):
        expected = "human" if t % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected:
            got = turn.get("from") if isinstance(turn, dict) else turn
            raise fail(f"turn {t} should be from {expected!r} (turns alternate, starting with human), got {got!r}")
        value = turn.get("value")
        if not isinstance(value, str) or not value.strip():
            raise fail(f"turn {t} has an empty or non-string 'value'")
        turns.append((_ROLES[expected], value))

    n_placeholders = sum(text.count(IMAGE_TOKEN) for _, text in turns)
    n_images = 0 if image is None else 1
    if n_placeholders != n_images:
        raise fail(f"{n_placeholders} {IMAGE_TOKEN} placeholder(s) for {n_images} image(s)")
    if n_images and IMAGE_TOKEN not in turns[0][1]:
        raise fail(f"the {IMAGE_TOKEN} placeholder must be in the first human turn")

    if image is not None and image_root is not None:
        image = os.path.join(image_root, image)
    meta = {k: v for k, v in record.items() if k not in ("id", "image", "conversations")}
    return Sample(id=rid, image=image, turns=turns, meta=meta)


def load_llava_json(path: str | Path, image_root: str | None = None, strict: bool = True) -> list[Sample]:
    """Read and validate a LLaVA JSON file.

    `image_root`, if given, is joined to every image path (files are not checked for existence: on a 558k
    dataset that would cost minutes). A malformed record raises ValueError naming the record and the problem;
    with `strict=False` it is skipped instead, and the number skipped is logged as a warning, so that a few
    bad records in a web-scale file need not stop training.
    """
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    samples, errors = [], []
    for i, record in enumerate(records):
        try:
            samples.append(_parse_record(record, i, image_root))
        except ValueError as e:
            if strict:
                raise
            errors.append(str(e))
    if errors:
        logger.warning("%s: skipped %d malformed record(s), the first: %s", path, len(errors), errors[0])
    return samples


def image_groups(samples: list[Sample], max_turns: int) -> list[list[Sample]]:
    """Records about the same image in groups of up to `max_turns`, in the order in which images first appear;
    a text-only record is a group of its own, as is every record when `max_turns <= 1`."""
    if max_turns <= 1:
        return [[sample] for sample in samples]
    groups: dict[str, list[Sample]] = {}
    order: list[Sample | str] = []
    for sample in samples:
        if sample.image is None:
            order.append(sample)
            continue
        if sample.image not in groups:
            groups[sample.image] = []
            order.append(sample.image)
        groups[sample.image].append(sample)
    out = []
    for item in order:
        if isinstance(item, Sample):
            out.append([item])
            continue
        members = groups[item]
        out += [members[start : start + max_turns] for start in range(0, len(members), max_turns)]
    return out


def group_by_image(samples: list[Sample], max_turns: int) -> list[Sample]:
    """Merge records about the same image into multi-turn conversations of up to `max_turns` exchanges.

    Single-question datasets (ShapesWorld, VQA-style data) pay for the image tokens once per question; merged,
    as in LLaVA-Instruct's multi-turn records, they pay once per conversation. Groups keep the order in which
    records first appear (`image_groups`); the `<image>` placeholder stays in the first turn only. Text-only
    records and `max_turns <= 1` are left as they are. A group's meta is its first record's. Later turns can
    read earlier answers; `data.pack_shared_prefix` shares the image without that.
    """
    merged = []
    for chunk in image_groups(samples, max_turns):
        turns = list(chunk[0].turns)
        for other in chunk[1:]:
            turns += [
                (role, " ".join(text.replace(IMAGE_TOKEN, " ").split()) if role == "user" else text)
                for role, text in other.turns
            ]
        merged.append(
            Sample(
                id=chunk[0].id if len(chunk) == 1 else "+".join(str(s.id) for s in chunk),
                image=chunk[0].image,
                turns=turns,
                meta=dict(chunk[0].meta),
            )
        )
    return merged


def sample_to_record(sample: Sample, image_root: str | None = None) -> dict[str, Any]:
    """The JSON record of a sample; with `image_root`, the image path is written relative to it."""
    record: dict[str, Any] = {"id": sample.id}
    if sample.image is not None:
        record["image"] = sample.image if image_root is None else os.path.relpath(sample.image, image_root)
    record["conversations"] = [{"from": _FROM[role], "value": text} for role, text in sample.turns]
    record.update(sample.meta)
    return record


def save_llava_json(samples: list[Sample], path: str | Path, image_root: str | None = None) -> None:
    """Write samples as a LLaVA JSON file (inverse of `load_llava_json` with the same `image_root`)."""
    records = [sample_to_record(s, image_root) for s in samples]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False)


def sample_to_messages(sample: Sample) -> list[dict[str, Any]]:
    """Chat messages in the transformers multimodal format.

    Each `<image>` placeholder becomes a {"type": "image"} item where it stood, before or after the text, and
    is removed from the text (with the whitespace around it, as LLaVA's own preprocessing does).
    """
    messages = []
    for role, text in sample.turns:
        if IMAGE_TOKEN not in text:
            messages.append({"role": role, "content": [{"type": "text", "text": text}]})
            continue
        content: list[dict[str, str]] = []
        for k, piece in enumerate(text.split(IMAGE_TOKEN)):
            if k > 0:
                content.append({"type": "image"})
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
        messages.append({"role": role, "content": content})
    return messages
