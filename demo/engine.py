"""Looking into a SparseCut model's answers: chat sessions, shortcut and fusion visualisations, costs.

The library side of the interactive demo (`app.py`, `demo/`). The UI only lays components out and calls:

- `ChatEngine`: one loaded model shared by every user. It builds prompts (keeping image tokens whole and
  dropping old turns, shortening the answer, then cutting text to fit the LLM's context), streams answers with
  `generate` while recording the prefill's `ShortcutStats`, measures costs, and scores an answer under changed
  shortcut scales (teacher forcing). Asked for a quantization that bitsandbytes cannot give on the device, it
  loads the model unquantized and says so (`ChatEngine.notices`).
- `ChatSession`: one user's conversation. A new image starts a new image context: only turns since the
  latest image are re-sent to the model. Errors become chat messages and never cost the conversation.
- `render_visuals`: the panels beside an answer, drawn with OpenCV/PIL into fixed-size RGB arrays:
  `CHART_SIZE` for the shortcut chart, `VIEW_SIZE` x `VIEW_SIZE` for every map. Maps are drawn over the
  padded square image the model saw (the processor pads to a square with the mean colour first).

Everything the panels show comes from the forward pass that produced the answer (`record_stats` around
`generate`), so inspecting an answer never runs the model again.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from threading import Event, Thread
from typing import Literal

import cv2
import numpy as np
import psutil
import torch
from PIL import Image, ImageDraw, ImageFont
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from .images import InvalidInputError, load_image
from .modeling import ShortcutStats, SparseCutForConditionalGeneration
from .processing import SparseCutProcessor
from .vision import pad_to_square

logger = logging.getLogger(__name__)

VIEW_SIZE = 384  # every map is VIEW_SIZE x VIEW_SIZE pixels
CHART_SIZE = (640, 384)  # (width, height) of the shortcut chart
RATIO_COLORMAP = cv2.COLORMAP_VIRIDIS
ATTENTION_COLORMAP = cv2.COLORMAP_INFERNO
OVERLAY_ALPHA = 0.55  # weight of the colour map over the image

TINY = "tiny"  # model name of `sparsecut.testing.tiny_model()`, for development and tests
MIN_ANSWER_TOKENS = 32  # the answer is shortened down to this many tokens before the question is cut


class PromptTooLongError(ValueError):
    """Even with every earlier turn left out and the question cut short, the prompt does not fit."""


# --- generation settings, prompts, answers ------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy decoding
    top_p: float = 1.0

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
        return "\n".join(
            [
                "| LLM input tokens | text | total |",
                "|---|---:|---:|",
                f"| **this model (SparseCut)** | {text_tokens} | **{self.input_tokens}** |",
                f"| LLaVA-1.5 style | {text_tokens} | {self.llava_input_tokens} |",
                f"| high-res tokens appended | {text_tokens} | {self.appended_input_tokens} |",
                "",
                "| measured | |",
                "|---|---|",
                f"| time to first token | {self.time_to_first_token:.2f} s |",
                f"| decode speed | {self.tokens_per_second:.1f} tokens/s ({self.new_tokens} new tokens) |",
                f"| {self.memory_kind} | {mib:,.0f} MiB |",
                f"| quantization | {self.quantization} |",
                f"| device | {self.device} |",
            ]
        )


@dataclass
class Answer:
    """A finished answer with everything needed to inspect it later."""

    text: str
    token_ids: list[int]  # the generated tokens (EOS included when generation stopped on it)
    prompt: Prompt
    settings: GenerationSettings
    stats: ShortcutStats | None  # from the generate prefill; None for a text-only prompt
    cost: Cost
    view: Image.Image | None  # the padded square image the model saw, for overlays


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


class _PeakMemory:
    """Peak memory during one generation: CUDA's allocator peak, or the process RSS sampled at every update
    (psutil cannot read a process's peak RSS on Linux)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.kind = "peak CUDA memory allocated"
        else:
            self.process = psutil.Process()
            self.kind = "peak process RSS"
            self.peak = 0
            self.sample()

    def sample(self) -> None:
        if self.device.type != "cuda":
            self.peak = max(self.peak, self.process.memory_info().rss)

    def result(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        self.sample()
        return self.peak


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
    ):
        self.model = model
        self.processor = processor
        self.quantization = quantization
        self.notices = list(notices)  # what the operator should know about how the model was loaded
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
        from .build import load_model, quantization_unavailable, resolve_device

        target = resolve_device(device)
        notices = []
        if model == TINY:
            from .testing import tiny_model

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
        for notice in notices:
            logger.warning(notice)
        return cls(loaded, processor, quantization=quantization, max_new_tokens=max_new_tokens, notices=notices)

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

    def describe(self) -> str:
        """A one-paragraph markdown summary of the model."""
        config = self.config
        return (
            f"**{config.vision_config.model_type}** encoder ({config.vision_depth} layers, {config.image_size} px) + "
            f"**{config.text_config.model_type}** LLM ({config.llm_depth} layers); fusion **{config.fusion}** with "
            f"a {config.high_res_grid}x{config.high_res_grid} high-res grid; **{config.num_shortcuts}** shortcuts; "
            f"{config.num_image_tokens} image tokens per image; {self.quantization} quantization on {self.device}."
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
        tokenizer = self.processor.tokenizer
        marker = " [...]"
        # Decoding a cut and tokenizing it again can merge tokens differently, so check and cut again.
        for _ in range(4):
            ids = tokenizer(exchange.question, add_special_tokens=False)["input_ids"]
            keep = len(ids) - (length - budget) - len(tokenizer(marker, add_special_tokens=False)["input_ids"])
            if keep <= 0:
                raise PromptTooLongError(
                    f"The image and the chat template alone need about {length - len(ids)} of the model's "
                    f"{self.context_length} tokens, leaving no room for an answer of "
                    f"{self.context_length - budget} tokens; lower the maximum number of new tokens."
                )
            exchange = replace(exchange, question=tokenizer.decode(ids[:keep]) + marker)
            length = self.count_tokens(to_messages([exchange]))
            if length <= budget:
                return exchange, length
        raise PromptTooLongError("The question could not be cut to fit the model's context.")

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

        memory = _PeakMemory(self.device)
        started = time.perf_counter()
        worker = Thread(target=run, name="sparsecut-generate", daemon=True)
        worker.start()
        text = ""
        try:
            for piece in streamer:
                text += piece
                memory.sample()
                yield Streamed(text)
        finally:
            stop.set()
            worker.join()
        if "error" in outcome:
            raise outcome["error"]
        token_ids = outcome["sequences"][0, prompt.length :].tolist()
        cost = self._cost(prompt, streamer, started, memory)
        view = None if prompt.image is None else self.padded_view(prompt.image)
        yield Streamed(text, Answer(text, token_ids, prompt, settings, outcome.get("stats"), cost, view))

    def padded_view(self, image: Image.Image) -> Image.Image:
        """The image as the processor frames it: padded to a square with the normalisation mean colour."""
        if not self.processor.pad_to_square:
            return image
        return pad_to_square(image, tuple(int(round(255 * m)) for m in self.processor.image_mean))

    def _cost(self, prompt: Prompt, streamer: _TimedStreamer, started: float, memory: _PeakMemory) -> Cost:
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
            peak_memory_bytes=memory.result(),
            memory_kind=memory.kind,
            quantization=self.quantization,
            device=str(self.device),
            llava_input_tokens=text_tokens + n_images * low_res,
            appended_input_tokens=text_tokens + n_images * (1 + config.high_res_grid**2) * low_res,
        )

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


def shortcut_label(vision_layer: int, llm_layer: int) -> str:
    return f"vision layer {vision_layer} → LLM layer {llm_layer}"


# --- errors -------------------------------------------------------------------------------------------------
def release_memory() -> None:
    """Free what a failed request left behind, so the next one starts from a clean slate (after an out-of-memory
    error above all). An exception handed over from the generation thread sits in a reference cycle with that
    thread's frames (and their tensors), which only the cycle collector frees; then CUDA's caching allocator
    returns the freed blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
    image: Image.Image | None = None  # the image sent with this question: it starts a new image context
    attachment: str | None = None  # the file the user attached (shown in the transcript if it loaded)
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
            f"log p(original answer) = **{self.original_logprob:.3f}** with the trained shortcuts, "
            f"**{self.modified_logprob:.3f}** with scales {format_scales(self.scales)}: "
            f"change **{change:+.3f}** nats over {self.tokens} tokens (teacher-forced)."
        )


def format_scales(scales: Sequence[float]) -> str:
    return "[" + ", ".join(f"{s:g}" for s in scales) + "]"


@dataclass
class ChatSession:
    """One user's conversation. Kept in the UI's session state; plain data, so it can be copied and pickled."""

    turns: list[Turn] = field(default_factory=list)
    last_answer: Answer | None = None

    def context(self) -> list[Turn]:
        """The turns re-sent with the next question: those since the latest image, failed ones left out."""
        kept = [turn for turn in self.turns if turn.in_context]
        starts = [i for i, turn in enumerate(kept) if turn.image is not None]
        return kept[starts[-1] :] if starts else kept

    def clear(self) -> None:
        self.turns.clear()
        self.last_answer = None

    def ask(
        self, engine: ChatEngine, question: str, image=None, settings: GenerationSettings | None = None
    ) -> Iterator[Turn]:
        """Add a turn and stream its answer; yields the turn after each update.

        `image` is anything `load_image` takes (a path is also shown in the transcript). A bad image or any
        error while answering ends the turn with an error message (logged with its traceback); the turns
        before it are kept and the next question works as usual.
        """
        settings = settings or GenerationSettings(max_new_tokens=engine.max_new_tokens)
        history = self.context()
        turn = Turn(question=question.strip(), attachment=image if isinstance(image, str) else None)
        self.turns.append(turn)
        self.last_answer = None
        yield turn
        if not turn.question and image is None:
            turn.status, turn.error = "failed", "⚠️ The message is empty: type a question or attach an image."
            yield turn
            return
        try:
            if image is not None:
                turn.image = load_image(image)
                if history:
                    turn.notices.append("New image: earlier turns are no longer sent to the model.")
                history = []
            exchanges = [Exchange(t.question, t.image, t.answer) for t in history]
            prompt = engine.build_prompt([*exchanges, Exchange(turn.question, turn.image)], settings.max_new_tokens)
            turn.notices.extend(prompt.notices)
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
            if turn.status == "pending":  # the consumer closed the stream: the user stopped the answer
                turn.status = "stopped"
        if turn.status == "failed":
            release_memory()  # here, after the except block: until it ends, the error keeps the failed step alive
            yield turn

    def retry(self, engine: ChatEngine, settings: GenerationSettings | None = None) -> Iterator[Turn]:
        """Ask the last question again (with its image), replacing its answer."""
        if not self.turns:
            return
        last = self.turns.pop()
        yield from self.ask(engine, last.question, last.attachment or last.image, settings)

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
            shown = turn.attachment is not None and turn.image is not None
            content: list = [{"path": turn.attachment}] if shown else []
            if turn.question:
                content.append(turn.question)
            messages.append({"role": "user", "content": content})
            messages.append({"role": "assistant", "content": turn.reply()})
        return messages


# --- visualisation ------------------------------------------------------------------------------------------
def normalise(values: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1] (NaN -> 0; a constant map -> zeros)."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0)
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def overlay(
    image: Image.Image, values: np.ndarray, colormap: int = ATTENTION_COLORMAP, size: int = VIEW_SIZE
) -> np.ndarray:
    """A (rows, cols) map drawn over the image: (size, size, 3) uint8 RGB. Each map cell becomes a block
    (nearest-neighbour upsampling), so the picture shows exactly the model's patch grid."""
    base = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    heat = cv2.resize(normalise(values), (size, size), interpolation=cv2.INTER_NEAREST)
    colours = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), colormap)[..., ::-1]  # BGR -> RGB
    return np.round(base * (1 - OVERLAY_ALPHA) + colours * OVERLAY_ALPHA).astype(np.uint8)


def mark_cell(picture: np.ndarray, row: int, col: int, cells: int) -> np.ndarray:
    """Outline cell (row, col) of a cells x cells grid on a square picture."""
    size = picture.shape[0]
    top, left = round(row * size / cells), round(col * size / cells)
    bottom, right = round((row + 1) * size / cells) - 1, round((col + 1) * size / cells) - 1
    marked = picture.copy()
    cv2.rectangle(marked, (left, top), (right, bottom), (255, 255, 255), 2)
    return marked


def high_res_to_grid(values: np.ndarray, side: int, grid: int) -> np.ndarray:
    """Values over high-res tokens in the fusion's key order (crop-major: h = (cy*grid + cx)*side**2 +
    row*side + col) -> their places on the whole image's (grid*side, grid*side) grid:
    (..., grid*grid*side*side) -> (..., grid*side, grid*side)."""
    values = np.asarray(values)
    lead = values.shape[:-1]
    crops = values.reshape(*lead, grid, grid, side, side)  # (..., cy, cx, row, col)
    return np.moveaxis(crops, -2, -3).reshape(*lead, grid * side, grid * side)  # (..., cy, row, cx, col)


def neighbours_to_grid(values: np.ndarray, side: int, grid: int) -> np.ndarray:
    """concat_mlp neighbour shares (side*side, grid*grid) (low-res patch, neighbour row-major inside the
    patch's area) -> the whole image's (grid*side, grid*side) grid of high-res tokens."""
    areas = np.asarray(values).reshape(side, side, grid, grid)  # (py, px, ny, nx)
    return areas.transpose(0, 2, 1, 3).reshape(side * grid, side * grid)  # (py, ny, px, nx)


def patch_at(x: float, y: float, size: int, side: int) -> tuple[int, int]:
    """The low-res patch (row, col) under pixel (x, y) of a size x size view."""
    clamp = lambda v: min(side - 1, max(0, int(v * side // size)))  # noqa: E731
    return clamp(y), clamp(x)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _draw_arrow(draw: ImageDraw.ImageDraw, x: float, y: float, length: float, colour) -> None:
    # Pillow's bundled font has no "→" glyph, and a system font is not guaranteed on every host.
    draw.line([(x, y), (x + length, y)], fill=colour, width=2)
    draw.polygon([(x + length + 4, y), (x + length - 3, y - 4), (x + length - 3, y + 4)], fill=colour)


def shortcut_means(stats: ShortcutStats, image_index: int = -1) -> list[float]:
    """Mean ||added|| / ||hidden|| over the image tokens of one image, per shortcut (NaN: layer did not run)."""
    ratios = stats.ratios[:, image_index].numpy()  # (k, T_img)
    return [float(np.mean(r)) if np.isfinite(r).any() else math.nan for r in ratios]


def shortcut_chart(stats: ShortcutStats, selected: int | None = None, image_index: int = -1) -> np.ndarray:
    """Horizontal bars of each shortcut's mean ||added|| / ||hidden||, one row per shortcut in LLM-layer order,
    labelled "vision layer v → LLM layer l": (CHART_SIZE[1], CHART_SIZE[0], 3) uint8 RGB."""
    width, height = CHART_SIZE
    picture = Image.new("RGB", CHART_SIZE, "white")
    draw = ImageDraw.Draw(picture)
    ink, grey = (30, 30, 30), (150, 150, 150)
    draw.text((12, 10), "Shortcut contributions: mean |added| / |hidden| at image tokens", fill=ink, font=_font(16))
    means = shortcut_means(stats, image_index)
    if not means:
        draw.text((12, height // 2), "This model has no shortcuts.", fill=ink, font=_font(15))
        return np.asarray(picture)
    top, bottom, bar_left, bar_right = 44, height - 34, 250, width - 70
    row_height = min(36.0, (bottom - top) / len(means))
    finite = [m for m in means if math.isfinite(m)]
    scale = max(finite) if finite and max(finite) > 0 else 1.0
    font = _font(max(10, min(14, int(row_height * 0.5))))
    order = sorted(range(len(means)), key=lambda k: (stats.llm_layers[k], k))
    for row, k in enumerate(order):
        y = top + row * row_height
        middle = y + row_height / 2
        first, second = f"vision layer {stats.vision_layers[k]}", f"LLM layer {stats.llm_layers[k]}"
        draw.text((12, middle), first, fill=ink, font=font, anchor="lm")
        arrow_x = 12 + draw.textlength(first, font=font) + 6
        _draw_arrow(draw, arrow_x, middle, 14, ink)
        draw.text((arrow_x + 24, middle), second, fill=ink, font=font, anchor="lm")
        value = means[k]
        if not math.isfinite(value):
            draw.text((bar_left, middle), "n/a", fill=grey, font=font, anchor="lm")
            continue
        right = bar_left + (bar_right - bar_left) * value / scale
        colour = (230, 120, 30) if k == selected else (60, 110, 180)
        draw.rectangle([bar_left, y + row_height * 0.18, max(right, bar_left + 1), y + row_height * 0.82], fill=colour)
        draw.text((right + 6, middle), f"{value:.3f}", fill=ink, font=font, anchor="lm")
    draw.line([(bar_left, bottom + 4), (bar_right, bottom + 4)], fill=grey, width=1)
    for fraction in (0.0, 0.5, 1.0):
        x = bar_left + (bar_right - bar_left) * fraction
        draw.line([(x, bottom + 2), (x, bottom + 8)], fill=grey, width=1)
        draw.text((x, bottom + 10), f"{scale * fraction:.3g}", fill=grey, font=_font(11), anchor="mt")
    draw.text((12, bottom + 10), "top: earliest LLM layer", fill=grey, font=_font(11), anchor="lt")
    return np.asarray(picture)


def text_picture(message: str, size: tuple[int, int] = (VIEW_SIZE, VIEW_SIZE)) -> np.ndarray:
    """A plain picture with a short message, for panels that have nothing to show."""
    picture = Image.new("RGB", size, (245, 245, 245))
    ImageDraw.Draw(picture).multiline_text(
        (size[0] / 2, size[1] / 2), message, fill=(90, 90, 90), font=_font(15), anchor="mm", align="center"
    )
    return np.asarray(picture)


@dataclass
class Visuals:
    """The panels beside an answer. Maps are (VIEW_SIZE, VIEW_SIZE, 3) uint8, the chart CHART_SIZE."""

    chart: np.ndarray | None = None
    shortcut_map: np.ndarray | None = None
    fusion_maps: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (vision layer, map), fused layers
    fusion_map: np.ndarray | None = None  # the selected layer's map
    query_map: np.ndarray | None = None
    shortcut_note: str = ""  # markdown explaining the shortcut map
    fusion_note: str = ""  # markdown explaining the fusion maps
    summary: dict = field(default_factory=dict)  # the numbers behind the pictures, JSON-able


def fusion_kind(stats: ShortcutStats) -> str:
    if stats.fusion_attention is not None:
        return "cross_attention"
    return "concat_mlp" if stats.fusion_contribution is not None else "none"


def render_visuals(
    answer: Answer | None, shortcut: int = 0, vision_layer: int | None = None, row: int = 0, col: int = 0
) -> Visuals:
    """Everything the demo shows about `answer`, for the chosen shortcut, fused vision layer (None: the last
    fused layer) and low-res query patch (row, col)."""
    if answer is None or answer.stats is None or answer.view is None:
        nothing = "The latest answer had no image, so there is nothing to show."
        return Visuals(shortcut_note=nothing, fusion_note=nothing)
    stats, view = answer.stats, answer.view
    side, grid = stats.patches_per_side, stats.high_res_grid
    k = len(stats.vision_layers)
    shortcut = min(max(shortcut, 0), max(k - 1, 0))
    row, col = min(max(row, 0), side - 1), min(max(col, 0), side - 1)
    if vision_layer not in stats.fused_layers:
        vision_layer = stats.fused_layers[-1]
    slot = stats.fused_layers.index(vision_layer)
    means = shortcut_means(stats)
    visuals = Visuals(chart=shortcut_chart(stats, selected=shortcut))
    visuals.summary = {
        "shortcuts": [
            {"index": i, "vision_layer": v, "llm_layer": layer, "mean_ratio": None if math.isnan(m) else m}
            for i, (v, layer, m) in enumerate(zip(stats.vision_layers, stats.llm_layers, means))
        ],
        "selected_shortcut": shortcut,
        "fusion": fusion_kind(stats),
        "fused_layers": stats.fused_layers,
        "vision_layer": vision_layer,
        "patch": [row, col],
        "patches_per_side": side,
        "high_res_grid": grid,
        "cost": answer.cost.as_dict(),
        "view_size": VIEW_SIZE,
        "chart_size": list(CHART_SIZE),
    }
    if k:
        # Only the low-res view's tokens enter the LLM (except in the appended-tokens baseline, whose
        # low-res tokens come first), and they sit on the side x side patch grid.
        ratios = stats.ratios[shortcut, -1, : side * side].numpy().reshape(side, side)
        visuals.shortcut_map = overlay(view, ratios, RATIO_COLORMAP)
        visuals.shortcut_note = (
            f"**{shortcut_label(stats.vision_layers[shortcut], stats.llm_layers[shortcut])}**: |added| / |hidden| "
            f"per image patch, from {np.nanmin(ratios):.3f} (dark) to {np.nanmax(ratios):.3f} (bright)."
        )
    else:
        visuals.shortcut_note = "This model has no shortcuts."
    kind = fusion_kind(stats)
    if kind == "cross_attention":
        _attention_visuals(visuals, stats, view, slot, row, col)
    elif kind == "concat_mlp":
        _contribution_visuals(visuals, stats, view, slot, row, col)
    else:
        visuals.fusion_note = (
            "This model has no multi-grained fusion (fusion='none'): the LLM sees low-res tokens only."
        )
    return visuals


def _attention_visuals(visuals: Visuals, stats: ShortcutStats, view: Image.Image, slot: int, row: int, col: int):
    side, grid, cells = stats.patches_per_side, stats.high_res_grid, stats.patches_per_side * stats.high_res_grid
    attention = stats.fusion_attention[:, -1].numpy()  # (L, P, G*P)
    received = high_res_to_grid(attention.sum(axis=1), side, grid)  # (L, cells, cells): mass each key receives
    visuals.fusion_maps = [(v, overlay(view, received[j])) for j, v in enumerate(stats.fused_layers)]
    visuals.fusion_map = visuals.fusion_maps[slot][1]
    query = high_res_to_grid(attention[slot, row * side + col], side, grid)  # (cells, cells)
    visuals.query_map = mark_cell(overlay(view, query), row, col, side)
    own_area = float(query[row * grid : (row + 1) * grid, col * grid : (col + 1) * grid].sum())
    peak = np.unravel_index(int(np.argmax(query)), query.shape)
    visuals.fusion_note = (
        f"**Vision layer {stats.fused_layers[slot]}**: attention each high-res token receives from all low-res "
        f"queries ({cells}x{cells} high-res grid). Low-res patch ({row}, {col}) (outlined) puts "
        f"{own_area:.0%} of its attention on its own area; its peak is high-res token {tuple(map(int, peak))} "
        f"({query.max():.3f})."
    )
    visuals.summary["query_attention_own_area"] = own_area


def _contribution_visuals(visuals: Visuals, stats: ShortcutStats, view: Image.Image, slot: int, row: int, col: int):
    side, grid = stats.patches_per_side, stats.high_res_grid
    shares = stats.fusion_contribution[:, -1].numpy()  # (L, P, 1 + G)
    maps = [neighbours_to_grid(shares[j, :, 1:], side, grid) for j in range(len(stats.fused_layers))]
    visuals.fusion_maps = [(v, overlay(view, maps[j])) for j, v in enumerate(stats.fused_layers)]
    visuals.fusion_map = visuals.fusion_maps[slot][1]
    visuals.query_map = mark_cell(visuals.fusion_map, row, col, side)
    patch = shares[slot, row * side + col]
    neighbours = ", ".join(f"{s:.0%}" for s in patch[1:])
    visuals.fusion_note = (
        f"**Vision layer {stats.fused_layers[slot]}** (concat-MLP fusion): share of each high-res token in its "
        f"low-res patch's fused token. Patch ({row}, {col}): low-res token {patch[0]:.0%}, high-res "
        f"neighbours {neighbours} (row-major)."
    )
    visuals.summary["patch_shares"] = [float(s) for s in patch]
