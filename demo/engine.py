"""The chat engine behind the demo (`app.py`, `demo/ui.py`): chat sessions, error strings, costs.

The UI only lays components out and calls:

- `ChatEngine`: one loaded model shared by every user. It builds prompts (keeping image tokens whole and
  dropping old turns, shortening the answer, then cutting text to fit the LLM's context), streams answers with
  `generate` while recording the prefill's `ShortcutStats`, measures costs, and scores an answer under changed
  shortcut scales (teacher forcing). Asked for a quantization that bitsandbytes cannot give on the device, it
  loads the model unquantized and says so (`ChatEngine.notices`).
- `ChatSession`: one user's conversation. A new image starts a new image context: only turns since the
  latest image are re-sent to the model. Errors become chat messages and never cost the conversation.
  Bounded: images are decoded straight to `ChatEngine.image_side` pixels within the demo's limits
  (`ChatEngine.load_image`), a chat keeps its latest MAX_KEPT_TURNS turns and only its latest image.

The panels beside an answer are drawn by `sparsecut.inspection.render_visuals` from the forward pass that
produced the answer (`record_stats` around `generate`), so inspecting an answer never runs the model again.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from threading import Event, Thread
from typing import Literal

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from sparsecut.data.images import InvalidInputError, load_image
from sparsecut.evaluation.world_check import WorldCheck
from sparsecut.inspection import VIEW_SIZE, Relevance, relevance_of_answer, shortcut_label
from sparsecut.modeling import ShortcutStats, SparseCutForConditionalGeneration
from sparsecut.processing import SparseCutProcessor
from sparsecut.utils import PeakMemory, markdown_table, release_memory
from sparsecut.vision import fit_within, pad_to_square

logger = logging.getLogger(__name__)

TINY = "tiny"  # model name of `sparsecut.testing.tiny_model()`, for development and tests
MIN_ANSWER_TOKENS = 32  # the answer is shortened down to this many tokens before the question is cut

# What the demo accepts (README, "Demo"). JPEG is decoded at a reduced scale, so only its header size is limited;
# other formats are decoded at full size, so their decoded size is (IMAGE_DECODE_BYTES: 8.4 megapixels of RGB).
IMAGE_MAX_PIXELS = 100_000_000
IMAGE_MAX_SIDE = 12_000
IMAGE_MAX_ASPECT = 20
IMAGE_DECODE_BYTES = 32 * 2**20
MAX_KEPT_TURNS = 20  # a chat keeps its latest turns; older ones (and their images) are dropped
MAX_QUESTION_CHARS = 20_000  # longer questions are cut before they are tokenized (they cannot fit anyway)
MAX_TEMPERATURE = 100.0
_SURROGATES = re.compile("[\ud800-\udfff]")


class PromptTooLongError(ValueError):
    """Even with every earlier turn left out and the question cut short, the prompt does not fit."""


# --- generation settings, prompts, answers ------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy decoding
    top_p: float = 1.0

    @classmethod
    def from_values(cls, max_new_tokens, temperature, top_p) -> GenerationSettings:
        """Settings from values as a client sent them (numbers, or anything else): never raises; `problem()` says
        what is wrong with them."""
        number = lambda v: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v  # noqa: E731
        tokens = number(max_new_tokens)
        if isinstance(tokens, float) and math.isfinite(tokens) and tokens.is_integer():
            tokens = int(tokens)
        return cls(tokens, number(temperature), number(top_p))

    def problem(self) -> str | None:
        """Why these settings cannot be used, as a sentence for the chat; None when they can."""
        checks = (
            ("max_new_tokens", self.max_new_tokens, "a whole number of at least 1"),
            ("temperature", self.temperature, f"a number from 0 (greedy) to {MAX_TEMPERATURE:g}"),
            ("top_p", self.top_p, "a number above 0 and at most 1"),
        )
        valid = {
            "max_new_tokens": lambda v: isinstance(v, int) and v >= 1,
            "temperature": lambda v: 0 <= v <= MAX_TEMPERATURE,
            "top_p": lambda v: 0 < v <= 1,
        }
        for name, value, wanted in checks:
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not numeric or not math.isfinite(value) or not valid[name](value):
                return f"⚠️ The setting {name} is {value!r}; it must be {wanted}. Nothing was generated."
        return None

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }


@dataclass
class Exchange:
    """One question (with an optional image) and, for earlier turns, the answer given."""

    question: str
    image: Image.Image | None = None
    answer: str | None = None


@dataclass
class Prompt:
    messages: list[dict]
    inputs: dict[str, torch.Tensor]  # input_ids (1, T), attention_mask, pixel_values (1, views, 3, S, S) or none
    image: Image.Image | None  # the one image in the prompt, if any
    notices: list[str] = field(default_factory=list)
    max_new_tokens: int | None = None  # most new tokens that fit in the context after it (None: no limit)

    @property
    def length(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


@dataclass
class Cost:
    """What one answer cost, and what the LLM input would have been for the two baselines."""

    input_tokens: int  # LLM input tokens (text + image)
    image_tokens: int  # of which image tokens
    new_tokens: int
    time_to_first_token: float  # seconds from the call to the first new token (encoding + prefill)
    tokens_per_second: float  # decode speed after the first token
    peak_memory_bytes: int
    memory_kind: str  # what peak_memory_bytes measures
    quantization: str
    device: str
    llava_input_tokens: int  # LLaVA-1.5: side*side image tokens per image
    appended_input_tokens: int  # high-res tokens appended: (1 + grid**2) * side*side per image

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def markdown(self) -> str:
        text_tokens = self.input_tokens - self.image_tokens
        mib = self.peak_memory_bytes / 2**20
        tokens = markdown_table(
            ["LLM input tokens", "text", "total"],
            [
                ["**this model (SparseCut)**", text_tokens, f"**{self.input_tokens}**"],
                ["LLaVA-1.5 style", text_tokens, self.llava_input_tokens],
                ["high-res tokens appended", text_tokens, self.appended_input_tokens],
            ],
            align="lrr",
        )
        measured = markdown_table(
            ["measured", ""],
            [
                ["time to first token", f"{self.time_to_first_token:.2f} s"],
                ["decode speed", f"{self.tokens_per_second:.1f} tokens/s ({self.new_tokens} new tokens)"],
                [self.memory_kind, f"{mib:,.0f} MiB"],
                ["quantization", self.quantization],
                ["device", self.device],
            ],
        )
        why = (
            f"SparseCut adds the high-res detail *into* the {self.image_tokens} image tokens the LLM already has "
            "(shortcuts add to hidden states, they add no tokens), so the LLM reads as many tokens as LLaVA-1.5; "
            f"appending the high-res tokens instead would make it {self.appended_input_tokens} tokens, and every "
            "answer token would attend to all of them."
        )
        return why + "\n\n" + tokens + "\n\n" + measured


@dataclass
class Answer:
    """A finished answer with everything needed to inspect it later."""

    text: str
    token_ids: list[int]  # the generated tokens (EOS included when generation stopped on it)
    prompt: Prompt
    settings: GenerationSettings
    stats: ShortcutStats | None  # from the generate prefill; None for a text-only prompt
    cost: Cost
    view: Image.Image | None  # the padded square image the model saw (at most `ChatEngine.image_side`), for overlays
    relevance: dict = field(default_factory=dict)  # answer token (None: all) -> `Relevance`, as worked out


@dataclass
class Streamed:
    """A streaming update: the text so far, and the `Answer` with the last update."""

    text: str
    answer: Answer | None = None


# --- the engine: one model, shared ------------------------------------------------------------------------
class _StopFlag(StoppingCriteria):
    """Stops `generate` at the next step once the event is set (the user pressed stop, or the stream closed)."""

    def __init__(self, event: Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _TimedStreamer(TextIteratorStreamer):
    """A TextIteratorStreamer that also notes when new tokens arrive: the streamed text is held back until a
    word is complete, so timing it would be off by a word."""

    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, **kwargs)
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.new_tokens = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:  # the first call carries the prompt
            now = time.perf_counter()
            self.first_token_at = self.first_token_at or now
            self.last_token_at = now
            self.new_tokens += value.numel()
        super().put(value)


def default_quantization(device: str) -> str:
    """4-bit on CUDA (a quarter of the memory); none on the CPU, where bitsandbytes' kernels are slower than
    plain float32 matmuls for a model this small."""
    return "4bit" if device == "cuda" or device.startswith("cuda:") else "none"


class ChatEngine:
    """A loaded model and processor, and everything that runs them.

    One generation at a time: `generate` runs on a worker thread and the stats recorder is a model attribute,
    so callers serialise the methods that run the model (the demo's queue runs them all under one
    concurrency id with limit 1).
    """

    def __init__(
        self,
        model: SparseCutForConditionalGeneration,
        processor: SparseCutProcessor,
        quantization: str = "none",
        max_new_tokens: int = 128,
        notices: Sequence[str] = (),
        world_check: WorldCheck | None = None,
    ):
        self.model = model
        self.processor = processor
        self.quantization = quantization
        self.notices = list(notices)  # what the operator should know about how the model was loaded
        self.world_check = world_check  # tells pictures unlike the model's training world (None: no check)
        self.config = model.config
        self.context_length: int | None = getattr(self.config.text_config, "max_position_embeddings", None)
        if self.context_length is not None:
            # Leave room for an image, the chat template and a short question.
            room = self.context_length - self.config.num_image_tokens - 32
            if room < 1:
                raise ValueError(f"The LLM's context of {self.context_length} tokens cannot hold one image.")
            max_new_tokens = min(max_new_tokens, room)
        self.max_new_tokens = max_new_tokens

    @classmethod
    def load(
        cls,
        model: str | None = None,
        quantization: str | None = None,
        device: str = "auto",
        max_new_tokens: int = 128,
    ) -> ChatEngine:
        """Load `model` (a checkpoint path or hub id, None for the default model in weights/, or "tiny" for a
        tiny random model) on `device`; `quantization` None picks `default_quantization` for the device.

        A quantization that bitsandbytes cannot give here (the package is missing, or it cannot quantize on
        this device) falls back to no quantization with a logged warning and a line in `notices`, instead of
        failing: the demo still runs, at full precision."""
        from sparsecut.build import (
            DEFAULT_WEIGHTS,
            load_model,
            quantization_unavailable,
            resolve_checkpoint,
            resolve_device,
        )

        target = resolve_device(device)
        notices = []
        if model == TINY:
            from sparsecut.testing import tiny_model

            if quantization not in (None, "none"):
                notices.append(f"The tiny model is built in memory and runs unquantized (asked: {quantization}).")
            loaded, processor = tiny_model()
            loaded.to(target)
            quantization = "none"
        else:
            quantization = quantization or default_quantization(str(target))
            problem = quantization_unavailable(quantization, target)
            if problem is not None:
                notices.append(f"{quantization} quantization was asked for, but {problem}: loading it unquantized.")
                quantization = "none"
            loaded, processor = load_model(model, quantization=quantization, device=str(target))
        world_check = None if model == TINY else WorldCheck.for_model(resolve_checkpoint(model or DEFAULT_WEIGHTS))
        for notice in notices:
            logger.warning(notice)
        return cls(
            loaded,
            processor,
            quantization=quantization,
            max_new_tokens=max_new_tokens,
            notices=notices,
            world_check=world_check,
        )

    @property
    def image_side(self) -> int:
        """The longest side an image is kept at: what the model's high-res view needs, or what the panels draw
        (VIEW_SIZE), whichever is larger. Nothing larger is ever decoded or kept."""
        return max(self.processor.image_size * self.processor.high_res_grid, VIEW_SIZE)

    def load_image(self, source) -> Image.Image:
        """A user's image, checked against the demo's limits and decoded straight to at most `image_side`
        pixels on its longest side (raises InvalidInputError with the reason)."""
        if isinstance(source, str) and not os.path.exists(source):
            raise InvalidInputError(
                "the attached file is no longer on the server (an upload is kept until its message is answered); "
                "please attach it again."
            )
        return load_image(
            source,
            max_pixels=IMAGE_MAX_PIXELS,
            max_side=IMAGE_MAX_SIDE,
            max_aspect=IMAGE_MAX_ASPECT,
            max_decode_bytes=IMAGE_DECODE_BYTES,
            fit=self.image_side,
        )

    def outside_world(self, image: Image.Image) -> str | None:
        """The notice for a picture outside the model's training world, or None (also when there is no check)."""
        if self.world_check is None or not self.world_check.is_outside(self.model, self.processor, image):
            return None
        return self.world_check.notice()

    # --- facts for the UI ----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def shortcut_labels(self) -> list[str]:
        shortcuts = self.model.shortcuts
        return [shortcut_label(v, layer) for v, layer in zip(shortcuts.vision_layers, shortcuts.llm_layers)]

    @property
    def fused_layers(self) -> list[int]:
        return list(self.config.fused_vision_layers)

    def describe(self, markdown: bool = True) -> str:
        """A one-paragraph summary of the model, in markdown or (for a terminal) plain text."""
        config = self.config
        bold = (lambda text: f"**{text}**") if markdown else (lambda text: text)
        fusion = {"concat_mlp": "concat-MLP", "cross_attention": "cross-attention", "none": "no"}[config.fusion]
        precision = "unquantized" if self.quantization == "none" else f"{self.quantization} quantized"
        return (
            f"{bold(config.vision_config.model_type)} encoder ({config.vision_depth} layers, {config.image_size} px) + "
            f"{bold(config.text_config.model_type)} LLM ({config.llm_depth} layers); {fusion} fusion of "
            f"a {config.high_res_grid}x{config.high_res_grid} high-res grid; {bold(config.num_shortcuts)} shortcuts; "
            f"{config.num_image_tokens} image tokens per image; {precision}, on {self.device}."
        )

    # --- prompts -------------------------------------------------------------------------------------------
    def count_tokens(self, messages: list[dict]) -> int:
        """Prompt length of chat messages, without preprocessing their images."""
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        n_images = text.count(self.processor.image_token)
        ids = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        return len(ids) + n_images * (self.processor.num_image_tokens - 1)  # each placeholder is one token

    def build_prompt(self, exchanges: Sequence[Exchange], max_new_tokens: int) -> Prompt:
        """Chat messages and model inputs for `exchanges` (earlier turns, then the new question), and how many
        new tokens fit after them (`Prompt.max_new_tokens`).

        When the prompt would not leave room for `max_new_tokens` in the LLM's context: the oldest turns are
        left out first (an image they carried moves to the next remaining question, so image tokens are never
        lost); then the answer is shortened, down to MIN_ANSWER_TOKENS (or `max_new_tokens` if fewer); only
        then is the new question's text cut. Each step adds a notice for the chat. Raises PromptTooLongError
        if the image and the chat template alone leave no room for that shortest answer.
        """
        exchanges = list(exchanges)
        context = self.context_length
        notices: list[str] = []
        length = self.count_tokens(to_messages(exchanges))
        dropped = 0
        while context is not None and length > context - max_new_tokens and len(exchanges) > 1:
            first = exchanges.pop(0)
            if first.image is not None and exchanges[0].image is None:
                exchanges[0] = replace(exchanges[0], image=first.image)
            dropped += 1
            length = self.count_tokens(to_messages(exchanges))
        if dropped:
            notices.append(
                f"The conversation was too long for the model's context of {context} tokens, so "
                f"the {dropped} oldest turn(s) were left out."
            )
        shortest_answer = min(max_new_tokens, MIN_ANSWER_TOKENS)
        if context is not None and length > context - shortest_answer:
            exchanges[-1], length = self._cut_question(exchanges[-1], length, context - shortest_answer)
            notices.append(
                f"Your question was cut short to fit the model's context of {context} tokens "
                f"({shortest_answer} of them kept for the answer); image tokens are never cut."
            )
        if context is not None and length > context - max_new_tokens:
            notices.append(
                f"The answer is limited to {context - length} new tokens (not {max_new_tokens}): the "
                f"conversation fills the rest of the model's context of {context} tokens."
            )
            max_new_tokens = context - length
        messages = to_messages(exchanges)
        inputs = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        image = next((e.image for e in exchanges if e.image is not None), None)
        return Prompt(
            messages=messages, inputs=dict(inputs), image=image, notices=notices, max_new_tokens=max_new_tokens
        )

    def _cut_question(self, exchange: Exchange, length: int, budget: int) -> tuple[Exchange, int]:
        """Cut the question's end so the prompt fits `budget` tokens.

        Tokens are counted on the text as the prompt carries it (escaped: a typed "<image>" or special token is
        several plain tokens there), and the cut falls between characters (the start of the first token left
        out), never inside one. Tokenizing a cut again can merge tokens differently, so it is checked and cut
        again if needed."""
        tokenizer = self.processor.tokenizer
        marker = " [...]"
        marker_tokens = len(tokenizer(marker, add_special_tokens=False)["input_ids"])
        text = self.processor.escape_text(exchange.question)  # escaping again changes nothing
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        own = len(encoded["input_ids"])
        if length - own + marker_tokens >= budget:
            raise PromptTooLongError(
                f"The image and the chat template alone need about {length - own} of the model's "
                f"{self.context_length} tokens, leaving no room for an answer of {self.context_length - budget} "
                "tokens; lower the maximum number of new tokens."
            )
        keep = own - (length - budget) - marker_tokens
        while keep > 0:
            cut = text[: encoded["offset_mapping"][keep][0]].rstrip()
            exchange = replace(exchange, question=cut + marker)
            length = self.count_tokens(to_messages([exchange]))
            if length <= budget:
                return exchange, length
            keep -= max(1, length - budget)
        exchange = replace(exchange, question=marker.strip())
        return exchange, self.count_tokens(to_messages([exchange]))

    # --- generation ----------------------------------------------------------------------------------------
    def stream(
        self, prompt: Prompt, settings: GenerationSettings, scales: Sequence[float] | None = None
    ) -> Iterator[Streamed]:
        """Generate an answer token by token; the last update carries the `Answer`.

        There is an update for every new token, even when the text has not grown (the streamer holds back
        incomplete words), so a consumer can always stop promptly. Closing the iterator early (the user
        pressed stop) stops `generate` at its next step. Exceptions raised by `generate` (out of memory, ...)
        are re-raised here, in the caller's thread; once it has dealt with them, `release_memory()` frees what
        the failed step held.
        """
        fits = self.max_new_tokens if prompt.max_new_tokens is None else min(self.max_new_tokens, prompt.max_new_tokens)
        settings = replace(settings, max_new_tokens=max(1, min(settings.max_new_tokens, fits)))
        inputs = {name: value.to(self.device) for name, value in prompt.inputs.items()}
        streamer = _TimedStreamer(self.processor.tokenizer)
        stop = Event()
        outcome: dict = {}

        def run() -> None:
            try:
                with torch.inference_mode(), self.model.record_stats() as recorded:
                    outcome["sequences"] = self.model.generate(
                        **inputs,
                        **settings.generate_kwargs(),
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_StopFlag(stop)]),
                        **({} if scales is None else {"shortcut_scales": list(scales)}),
                    )
                outcome["stats"] = recorded.last
            except BaseException as error:  # handed to the caller's thread, which decides what to show
                outcome["error"] = error
                streamer.end()  # unblock the consumer

        memory = PeakMemory(self.device)
        started = time.perf_counter()
        worker = Thread(target=run, name="sparsecut-generate", daemon=True)
        worker.start()
        text = ""
        try:
            for piece in streamer:
                text += piece
                yield Streamed(text)
        finally:
            stop.set()
            worker.join()
        if "error" in outcome:
            raise outcome["error"]
        token_ids = outcome["sequences"][0, prompt.length :].tolist()
        cost = self._cost(prompt, streamer, started, memory)
        view = None if prompt.image is None else self.padded_view(fit_within(prompt.image, self.image_side))
        yield Streamed(text, Answer(text, token_ids, prompt, settings, outcome.get("stats"), cost, view))

    def padded_view(self, image: Image.Image) -> Image.Image:
        """The image as the processor frames it: padded to a square with the normalisation mean colour."""
        if not self.processor.pad_to_square:
            return image
        return pad_to_square(image, tuple(int(round(255 * m)) for m in self.processor.image_mean))

    def _cost(self, prompt: Prompt, streamer: _TimedStreamer, started: float, memory: PeakMemory) -> Cost:
        config = self.config
        n_images = 0 if "pixel_values" not in prompt.inputs else int(prompt.inputs["pixel_values"].shape[0])
        image_tokens = n_images * config.num_image_tokens
        text_tokens = prompt.length - image_tokens
        low_res = config.patches_per_side**2
        first = streamer.first_token_at or time.perf_counter()
        last = streamer.last_token_at or first
        n = streamer.new_tokens
        speed = (n - 1) / (last - first) if n > 1 and last > first else n / max(last - started, 1e-9)
        return Cost(
            input_tokens=prompt.length,
            image_tokens=image_tokens,
            new_tokens=n,
            time_to_first_token=first - started,
            tokens_per_second=speed,
            peak_memory_bytes=memory.peak_bytes(),
            memory_kind=memory.kind,
            quantization=self.quantization,
            device=str(self.device),
            llava_input_tokens=text_tokens + n_images * low_res,
            appended_input_tokens=text_tokens + n_images * (1 + config.high_res_grid**2) * low_res,
        )

    def relevance(self, answer: Answer, token: int | None = None) -> Relevance | None:
        """Where `answer` came from in its image (`sparsecut.inspection.relevance`): of the whole answer, or of
        its `token`-th generated token. One extra forward and backward pass, once per answer and token (kept on
        the answer); None without an image or an answer."""
        ids = (
            answer.token_ids[:-1]
            if answer.token_ids[-1:] == [self.processor.tokenizer.eos_token_id]
            else answer.token_ids
        )
        if answer.stats is None or not ids or (token is not None and token >= len(ids)):
            return None
        if token not in answer.relevance:
            answer.relevance[token] = relevance_of_answer(self.model, answer.prompt.inputs, ids, token)
        return answer.relevance[token]

    def answer_tokens(self, answer: Answer) -> list[str]:
        """The answer's generated tokens as text, one string each (EOS left out)."""
        eos = self.processor.tokenizer.eos_token_id
        return [self.processor.tokenizer.decode([t]) for t in answer.token_ids if t != eos]

    def answer_logprob(self, answer: Answer, scales: Sequence[float] | None = None) -> float:
        """Sum of the log-probabilities of the answer's tokens given its prompt, teacher-forced, with the
        shortcuts scaled by `scales` (None: as trained)."""
        if not answer.token_ids:
            return 0.0
        inputs = {name: value.to(self.device) for name, value in answer.prompt.inputs.items()}
        targets = torch.tensor([answer.token_ids], device=self.device)
        input_ids = torch.cat([inputs["input_ids"], targets], dim=1)
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pixel_values=inputs.get("pixel_values"),
                shortcut_scales=None if scales is None else list(scales),
                logits_to_keep=targets.shape[1] + 1,  # the logits that predict the answer tokens, and one more
            )
        return sequence_logprob(out.logits[0, :-1], targets[0])


def sequence_logprob(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum over positions of log softmax(logits[t])[targets[t]]: logits (n, vocab), targets (n,)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return float(log_probs.gather(-1, targets[:, None].to(log_probs.device)).sum())


def to_messages(exchanges: Sequence[Exchange]) -> list[dict]:
    """Exchanges -> the processor's chat messages (image first, then the question)."""
    messages = []
    for exchange in exchanges:
        content: list[dict] = [] if exchange.image is None else [{"type": "image", "image": exchange.image}]
        content.append({"type": "text", "text": exchange.question})
        messages.append({"role": "user", "content": content})
        if exchange.answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": exchange.answer}]})
    return messages


# --- errors -------------------------------------------------------------------------------------------------
def error_message(error: BaseException) -> str:
    """What the chat shows for an error: a sentence a user can act on, never a stack trace."""
    if isinstance(error, InvalidInputError):
        return f"⚠️ I could not use this image: {error}"
    if isinstance(error, PromptTooLongError):
        return f"⚠️ {error}"
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return (
            "⚠️ The model ran out of memory on this request. Try fewer new tokens or a shorter conversation "
            "(clear it); the next request starts afresh."
        )
    return (
        f"⚠️ Something went wrong while answering ({type(error).__name__}). The details are in the server's "
        "log; please try again."
    )


# --- sessions -----------------------------------------------------------------------------------------------
TurnStatus = Literal["pending", "done", "stopped", "failed"]


@dataclass
class Turn:
    question: str
    image: Image.Image | None = None  # the image sent with this question, at most `ChatEngine.image_side`
    attachment: str | None = None  # the image's preview file, shown in the transcript (the upload is never kept)
    new_image: bool = False  # an image loaded with this question: it starts a new image context
    answer: str = ""
    notices: list[str] = field(default_factory=list)
    error: str | None = None
    status: TurnStatus = "pending"

    @property
    def in_context(self) -> bool:
        """Whether later questions re-send this turn (failed turns are shown but not sent)."""
        return self.status in ("done", "stopped")

    def reply(self) -> str:
        """The assistant's message as shown in the chat (markdown)."""
        parts = [f"_{notice}_" for notice in self.notices]
        if self.error is not None:
            parts.append(self.error)
        elif self.status == "pending":
            parts.append(self.answer or "…")
        else:
            parts.append(self.answer or "_(empty answer)_")
            if self.status == "stopped":
                parts.append("_(stopped)_")
        return "\n\n".join(parts)


@dataclass
class Comparison:
    """The answer with the trained shortcuts beside one regenerated with scaled shortcuts, and the change in
    log-probability of the original answer under the new scales."""

    scales: list[float]
    original: str
    modified: str = ""
    original_logprob: float | None = None
    modified_logprob: float | None = None
    tokens: int = 0
    error: str | None = None

    def markdown(self) -> str:
        if self.error is not None:
            return self.error
        if self.original_logprob is None or self.modified_logprob is None:
            return "_Generating with the new scales…_"
        change = self.modified_logprob - self.original_logprob
        return (
            f"How likely the model finds its original answer: **{self.original_logprob:.3f}** with the trained "
            f"shortcuts, **{self.modified_logprob:.3f}** with scales {format_scales(self.scales)}, a change of "
            f"**{change:+.3f}** (closer to 0 is more likely; below 0 the new scales make the original answer less "
            f"likely). <sub>log-probability in nats, summed over its {self.tokens} tokens, each scored after the "
            "original answer's earlier tokens (teacher forcing)</sub>"
        )


def format_scales(scales: Sequence[float]) -> str:
    return "[" + ", ".join(f"{s:g}" for s in scales) + "]"


def clean_text(value) -> tuple[str | None, list[str]]:
    """A question as a client sent it -> (text fit for the tokenizer, notices), or (None, [why not])."""
    if value is None:
        return "", []
    if not isinstance(value, str):
        return None, [f"⚠️ The message text must be a string, not {type(value).__name__}."]
    notices = []
    text, replaced = _SURROGATES.subn("\ufffd", value)
    if replaced:
        notices.append(
            f"Your message had {replaced} broken character(s) (unpaired UTF-16 surrogates); each was replaced by �."
        )
    if len(text) > MAX_QUESTION_CHARS:
        notices.append(f"Your message had {len(text):,} characters; only the first {MAX_QUESTION_CHARS:,} were read.")
        text = text[:MAX_QUESTION_CHARS]
    return text.strip(), notices


def _delete_files(paths: list[str]) -> None:
    for path in paths:
        try:
            os.remove(path)
        except OSError:
            pass
    paths.clear()


@dataclass
class ChatSession:
    """One user's conversation. Kept in the UI's session state; plain data, so it can be copied and pickled.

    Bounded: it keeps its latest MAX_KEPT_TURNS turns, only the latest image context's image (at most
    `ChatEngine.image_side` pixels; earlier turns keep a preview file for the transcript), and the latest answer.
    With `preview_dir` set, `transcript` writes each image's preview there as a PNG (once; an API client, which
    never asks for the transcript, gets none); the chat deletes its previews when
    their turns are dropped, when it is cleared or closed, and when it is garbage-collected (a chat that expired).
    """

    turns: list[Turn] = field(default_factory=list)
    last_answer: Answer | None = None
    preview_dir: str | None = None
    files: list[str] = field(default_factory=list)  # preview files this chat wrote and still shows

    def context(self) -> list[Turn]:
        """The turns re-sent with the next question: those since the latest image, failed ones left out."""
        kept = [turn for turn in self.turns if turn.in_context]
        starts = [i for i, turn in enumerate(kept) if turn.new_image]
        return kept[starts[-1] :] if starts else kept

    def clear(self) -> None:
        self._forget(self.turns)
        self.turns.clear()
        self.last_answer = None

    def close(self) -> None:
        """Forget everything and delete the session's files (the chat expired or its page was closed)."""
        self.clear()
        _delete_files(self.files)

    def _forget(self, turns: Sequence[Turn]) -> None:
        """Delete the preview files of `turns`."""
        gone = [turn.attachment for turn in turns if turn.attachment in self.files]
        for path in gone:
            self.files.remove(path)
        _delete_files(gone)

    def _write_preview(self, image: Image.Image) -> str | None:
        if self.preview_dir is None:
            return None
        os.makedirs(self.preview_dir, exist_ok=True)
        path = os.path.join(self.preview_dir, f"{uuid.uuid4().hex}.png")
        image.save(path)
        if not self.files:  # the first file: delete them all when the chat is collected
            weakref.finalize(self, _delete_files, self.files)
        self.files.append(path)
        return path

    def _preview(self, turn: Turn) -> None:
        if turn.new_image and turn.attachment is None and turn.image is not None:
            turn.attachment = self._write_preview(turn.image)

    def _add_turn(self, turn: Turn) -> None:
        self.turns.append(turn)
        if len(self.turns) > MAX_KEPT_TURNS:
            dropped = self.turns[: len(self.turns) - MAX_KEPT_TURNS]
            del self.turns[: len(dropped)]
            self._forget(dropped)
            turn.notices.append(
                f"This chat keeps its latest {MAX_KEPT_TURNS} turns: the oldest turn (and its image, if it had "
                "one) is no longer kept."
            )

    def ask(
        self,
        engine: ChatEngine,
        question,
        image=None,
        settings: GenerationSettings | None = None,
        notices: Sequence[str] = (),
        wanted: Callable[[], bool] | None = None,
    ) -> Iterator[Turn]:
        """Add a turn and stream its answer; yields the turn after each update.

        `question` is the text as the client sent it (anything: a non-string fails the turn with a message);
        `image` is anything `load_image` takes, decoded to at most `engine.image_side` pixels; `notices` go
        before the answer. `wanted()` is asked before the image is decoded and before generating: once it
        says False (the client left), the turn ends as stopped and nothing more is decoded. A bad image, bad
        settings or any error while answering end the turn with an error message (logged); the turns before it
        are kept and the next question works as usual.
        """
        settings = settings or GenerationSettings(max_new_tokens=engine.max_new_tokens)
        history = self.context()
        text, text_notices = clean_text(question)
        turn = Turn(question=text if text is not None else "", notices=[*notices, *text_notices])
        self._add_turn(turn)
        self.last_answer = None
        yield turn
        problem = (
            turn.notices.pop()
            if text is None
            else settings.problem()
            or (None if text or image is not None else "⚠️ The message is empty: type a question or attach an image.")
        )
        if problem is not None:
            turn.status, turn.error = "failed", problem
            yield turn
            return
        still_wanted = wanted or (lambda: True)
        try:
            if image is not None:
                if not still_wanted():
                    return
                turn.image = engine.load_image(image)
                turn.new_image = True
                outside = engine.outside_world(turn.image)
                if outside is not None:
                    turn.notices.append(outside)
                if history:
                    turn.notices.append("New image: earlier turns are no longer sent to the model.")
                history = []
            exchanges = [Exchange(t.question, t.image, t.answer) for t in history]
            prompt = engine.build_prompt([*exchanges, Exchange(turn.question, turn.image)], settings.max_new_tokens)
            turn.notices.extend(prompt.notices)
            if not still_wanted():
                return
            with closing(engine.stream(prompt, settings)) as updates:  # closed early: generate stops first
                for update in updates:
                    turn.answer = update.text
                    if update.answer is not None:
                        self.last_answer = update.answer
                        turn.status = "done"
                    yield turn
        except Exception as error:
            if isinstance(error, InvalidInputError):
                logger.info("Refused input: %s", error)
            else:
                logger.exception("Answering failed")
            turn.status, turn.error = "failed", error_message(error)
        finally:
            if turn.status == "pending":  # the consumer closed the stream, or the client left
                turn.status = "stopped"
            if turn.new_image and turn.in_context:  # earlier images are no longer sent: keep only their previews
                for earlier in self.turns[:-1]:
                    self._preview(earlier)  # the transcript still shows it
                    earlier.image = None
        if turn.status == "failed" or image is not None:
            # After the except block (until it ends, an error keeps the failed step alive), and after every
            # image: its decode buffers go back to the system instead of staying in the heap.
            release_memory()
        if turn.status == "failed":
            yield turn

    def retry(self, engine: ChatEngine, settings: GenerationSettings | None = None) -> Iterator[Turn]:
        """Ask the last question again (with its image), replacing its answer."""
        if not self.turns:
            return
        last = self.turns.pop()
        self._forget([last])
        yield from self.ask(engine, last.question, last.image, settings)

    def compare(self, engine: ChatEngine, scales: Sequence[float]) -> Iterator[Comparison]:
        """Regenerate the last answer with the shortcuts scaled by `scales` and score the original answer
        under those scales; yields the comparison as the new answer streams, then with the scores."""
        answer = self.last_answer
        if answer is None:
            return
        comparison = Comparison(scales=list(scales), original=answer.text, tokens=len(answer.token_ids))
        try:
            with closing(engine.stream(answer.prompt, answer.settings, scales=scales)) as updates:
                for update in updates:
                    comparison.modified = update.text
                    yield comparison
            comparison.original_logprob = engine.answer_logprob(answer)
            comparison.modified_logprob = engine.answer_logprob(answer, scales)
        except Exception as error:
            logger.exception("Comparing shortcut scales failed")
            comparison.error = error_message(error)
        if comparison.error is not None:
            release_memory()  # here, after the except block: until it ends, the error keeps the failed step alive
        yield comparison

    def transcript(self) -> list[dict]:
        """The conversation as role/content messages for a chat display (Gradio's Chatbot): a user message's
        content is its image file (as {"path": ...}) and its text."""
        messages = []
        for turn in self.turns:
            self._preview(turn)  # written when first shown: an API chat with one image writes none
            content: list = [] if turn.attachment is None else [{"path": turn.attachment}]
            if turn.question:
                content.append(turn.question)
            messages.append({"role": "user", "content": content})
            messages.append({"role": "assistant", "content": turn.reply()})
        return messages
