"""SparseCutProcessor: images + text (or chat messages) -> model inputs.

Every image becomes 1 + grid**2 views, or 1 + (2 * grid - 1)**2 with overlapping crops (see `sparsecut.vision`),
and its placeholder in the text is expanded into exactly `num_image_tokens` image tokens, the count the model's
feature layer produces (LLaVA-1.5's 576 for CLIP ViT-L/14-336). Chat messages are rendered with the LLM's own chat
template, so SparseCut keeps the prompt format the LLM was tuned on; user text is escaped so that typing "<image>"
or a special token creates neither an image position nor a fake turn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin

from .data.images import InvalidInputError, load_image
from .vision import HALF, RESIZE_MODES, crops_per_side, make_views

ZERO_WIDTH_SPACE = "\u200b"
ROLES = ("system", "user", "assistant")


def as_text(value) -> str:
    """User text as str: bytes are decoded as UTF-8 with invalid sequences replaced, never refused."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    if not isinstance(value, str):
        raise InvalidInputError(f"Text must be a string, got {type(value).__name__}.")
    return value


class SparseCutProcessor(ProcessorMixin):
    """Args:
    tokenizer: the LLM's tokenizer, with `image_token` added as a special token.
    image_size: encoder input size in pixels (every view is image_size x image_size).
    high_res_grid: the high-res view is cut into high_res_grid x high_res_grid crops.
    high_res_overlap: cut it into (2 * grid - 1)**2 crops at half a crop's stride instead
        (`SparseCutConfig.high_res_overlap`).
    num_image_tokens: image tokens per image in the LLM input (`SparseCutConfig.num_image_tokens`).
    image_mean, image_std: the encoder's normalisation.
    pad_to_square: pad images to a square with the mean colour before resizing (LLaVA-1.5), instead of
        squashing the aspect ratio.
    pad_color: the padding's RGB colour; None: the normalisation mean, rounded (LLaVA-1.5's code and
        transformers' LlavaImageProcessor truncate instead: [int(255 * m) for m in image_mean]).
    resize: "squash" (the image, padded or not, resized to the square) or "crop" (its shortest side resized, the
        centre square cut: CLIPImageProcessor's preprocessing, as llava-hf's LLaVA-1.5 checkpoints ship it).
    image_token: the placeholder string.
    content_items: hand each message's content to the chat template as a list of {"type": "image"} and
        {"type": "text", "text": ...} items, the form transformers' processors give LLaVA's templates, instead of
        one string with the placeholder where each image goes.
    padding_side: default padding side for batches ("left" suits generation; training collators pass "right").
    """

    def __init__(
        self,
        tokenizer=None,
        image_size: int = 224,
        high_res_grid: int = 2,
        high_res_overlap: bool = False,
        num_image_tokens: int = 196,
        image_mean: Sequence[float] = HALF,
        image_std: Sequence[float] = HALF,
        pad_to_square: bool = True,
        pad_color: Sequence[int] | None = None,
        resize: str = "squash",
        image_token: str = "<image>",
        content_items: bool = False,
        padding_side: str = "left",
        chat_template: str | None = None,
    ):
        self.image_size = int(image_size)
        self.high_res_grid = int(high_res_grid)
        self.high_res_overlap = bool(high_res_overlap)
        self.num_image_tokens = int(num_image_tokens)
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        self.pad_to_square = bool(pad_to_square)
        self.pad_color = None if pad_color is None else [int(c) for c in pad_color]
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}.")
        self.resize = resize
        self.image_token = image_token
        self.content_items = bool(content_items)
        self.padding_side = padding_side
        super().__init__(tokenizer, chat_template=chat_template)
        tokenizer.padding_side = padding_side
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {image_token!r} token; add it as a special token first.")

    @property
    def num_views(self) -> int:
        return 1 + crops_per_side(self.high_res_grid, self.high_res_overlap) ** 2

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    # --- images ----------------------------------------------------------------------------------------------
    def preprocess_images(self, images: Sequence) -> torch.Tensor:
        """Images (paths, bytes, PIL, arrays) -> pixel_values (n_images, views, 3, size, size)."""
        if not images:
            return torch.zeros(0, self.num_views, 3, self.image_size, self.image_size)
        views = [
            make_views(
                load_image(image),
                self.image_size,
                self.high_res_grid,
                self.image_mean,
                self.image_std,
                self.pad_to_square,
                self.high_res_overlap,
                self.resize,
                None if self.pad_color is None else tuple(self.pad_color),
            )
            for image in images
        ]
        return torch.from_numpy(np.stack(views))

    # --- text ------------------------------------------------------------------------------------------------
    def escape_text(self, text: str) -> str:
        """Neutralise the image placeholder and the tokenizer's special tokens inside user-typed text by
        putting a zero-width space after their first character (they then tokenize as plain text)."""
        specials = {self.image_token, *self.tokenizer.all_special_tokens}
        specials.update(
            str(token)
            for token in getattr(self.tokenizer, "added_tokens_decoder", {}).values()
            if getattr(token, "special", False)
        )
        for token in sorted(specials, key=len, reverse=True):
            if len(token) > 1 and token in text:
                text = text.replace(token, token[0] + ZERO_WIDTH_SPACE + token[1:])
        return text

    def __call__(
        self,
        images=None,
        text: str | Sequence[str] | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        padding_side: str | None = None,
        add_special_tokens: bool = True,
        **tokenizer_kwargs,
    ) -> BatchFeature:
        """Tokenize text whose `image_token` placeholders mark where the images go.

        images: None, one image, a flat list in placeholder order, or one list per text.
        Returns input_ids, attention_mask and (if there are images) pixel_values.
        """
        if text is None:
            raise ValueError("SparseCutProcessor needs text; put the image placeholder where each image goes.")
        texts = [text] if isinstance(text, str) else list(text)
        flat_images = self._flatten_images(images, len(texts))
        placeholders = sum(t.count(self.image_token) for t in texts)
        if placeholders != len(flat_images):
            raise ValueError(
                f"The text has {placeholders} {self.image_token!r} placeholder(s) "
                f"but {len(flat_images)} image(s) were given."
            )
        expanded = [t.replace(self.image_token, self.image_token * self.num_image_tokens) for t in texts]
        encoded = self.tokenizer(
            expanded,
            return_tensors=return_tensors,
            padding=padding,
            padding_side=padding_side,
            add_special_tokens=add_special_tokens,
            **tokenizer_kwargs,
        )
        data = dict(encoded)
        if flat_images:
            data["pixel_values"] = self.preprocess_images(flat_images)
        return BatchFeature(data=data, tensor_type=return_tensors)

    @staticmethod
    def _flatten_images(images, n_texts: int) -> list:
        if images is None:
            return []
        if not isinstance(images, (list, tuple)):
            return [images]
        if images and all(isinstance(item, (list, tuple)) for item in images):
            if len(images) != n_texts:
                raise ValueError(f"Got {len(images)} image lists for {n_texts} texts.")
            return [image for per_text in images for image in per_text]
        return list(images)

    # --- chat ------------------------------------------------------------------------------------------------
    def render_messages(self, messages: list[dict]) -> tuple[list[dict], list]:
        """Structured chat messages -> (messages for the LLM's chat template, images in order).

        Content may be a string or a list of {"type": "text", "text": ...} and {"type": "image"[, "image": x]}
        items; an image item becomes the placeholder at its place (or an image item, with `content_items`). Text is
        escaped (see `escape_text`).
        """
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InvalidInputError("A conversation is a non-empty list of messages.")
        rendered, images = [], []
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise InvalidInputError(f"Message {index} needs a role among {', '.join(ROLES)}.")
            content = message.get("content", "")
            if isinstance(content, (str, bytes)):
                content = [{"type": "text", "text": content}]
            if not isinstance(content, (list, tuple)):
                raise InvalidInputError(f"Message {index}: content must be text or a list of items.")
            parts, items = [], []
            for item in content:
                kind = item.get("type") if isinstance(item, dict) else None
                if kind == "image":
                    parts.append(self.image_token)
                    items.append({"type": "image"})
                    source = item.get("image", item.get("path"))
                    if source is not None:
                        images.append(source)
                elif kind == "text":
                    parts.append(self.escape_text(as_text(item.get("text", ""))))
                    items.append({"type": "text", "text": parts[-1]})
                else:
                    raise InvalidInputError(
                        f"Message {index}: unsupported content item {kind!r}; use 'text' or 'image'."
                    )
            rendered.append({"role": message["role"], "content": items if self.content_items else "\n".join(parts)})
        return rendered, images

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        images=None,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = "pt",
        chat_template: str | None = None,
        continue_final_message: bool = False,
        **kwargs,
    ):
        """Render chat messages with the LLM's chat template; with `tokenize=True` also process the images
        (taken from the image items, or from `images` in order) and return model inputs."""
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise InvalidInputError("A conversation is a non-empty list of messages (or a list of conversations).")
        batched = isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        template = chat_template or self.chat_template
        if template is None and self.tokenizer.chat_template is None:
            raise ValueError("The tokenizer has no chat template; pass chat_template=... .")
        prompts, found_images = [], []
        for messages in conversations:
            rendered, item_images = self.render_messages(messages)
            prompts.append(
                self.tokenizer.apply_chat_template(
                    rendered,
                    chat_template=template,
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message,
                )
            )
            found_images.append(item_images)
        if not tokenize:
            return prompts if batched else prompts[0]
        if images is None:
            images = found_images if any(found_images) else None
        inputs = self(images=images, text=prompts, return_tensors=return_tensors, add_special_tokens=False, **kwargs)
        return inputs if return_dict else inputs["input_ids"]
