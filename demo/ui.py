"""The Gradio UI of the sparsecut demo: layout and event wiring only.

Every number and picture comes from `demo.engine` (sessions, generation) and `sparsecut.inspection`
(visualisations); the functions here turn Gradio values into library calls and library results into component
values. `build_demo` lays out the chat, the panels and the API plumbing, then wires their events.

Endpoints (see README, "Demo"): `/chat` takes {"text": ..., "files": [...]} and streams the reply text;
`/visualize` returns the pictures and numbers behind the latest answer of the same client session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, closing
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
from gradio.utils import get_upload_folder
from starlette.middleware import Middleware

from demo.engine import ChatEngine, ChatSession, GenerationSettings
from demo.examples import EXAMPLES_DIR, Example
from demo.hosting import gpu
from demo.uploads import FILE_MAX_AGE_S, MAX_REQUEST_BYTES, PREVIEWS, RequestSizeLimit, Uploads
from sparsecut.inspection import VIEW_SIZE, Visuals, patch_at, render_visuals
from sparsecut.inspection.visuals import NO_IMAGE

MAX_QUEUE = 32  # requests waiting beyond this are turned away with "queue full"
MAX_UPLOAD = "10mb"
MAX_SESSIONS = 64  # chats kept in memory; one more drops the least recently used
SESSION_TTL_S = 900  # a chat not used for this long expires (its memory and its files are freed)
MODEL_EVENTS = "model"  # concurrency id shared by every event that runs the model: one generation at a time

HEADER = """# SparseCut: sparse shortcuts, looked into
Ask about an image. Beside each answer: **where in the image the answer came from**, how much each **shortcut**
(a vision layer fed into a layer of the language model) changed what the language model holds at the image,
what the **fusion** of the low- and high-res views does, what happens with shortcuts **switched off**, and what
the answer **cost** against LLaVA-1.5 and against appending the high-res tokens. The panels come from the pass
that produced the answer (where it came from: from one more pass, run once the answer is complete)."""


def _file_paths(message) -> list[str]:
    files = message.get("files") if isinstance(message, dict) else None
    files = files if isinstance(files, (list, tuple)) else []
    paths = [f.get("path") if isinstance(f, dict) else f for f in files]
    return [path for path in paths if isinstance(path, str) and path]


def _message_parts(message) -> tuple[object, str | None, list[str]]:
    """A MultimodalTextbox value -> (its text as sent, the first attached file or None, notices). One image is
    used per message; the notice says so when more were attached."""
    text = message.get("text") if isinstance(message, dict) else message
    paths = _file_paths(message)
    notices = []
    if len(paths) > 1:
        notices.append(f"One image per message: the first was used, the other {len(paths) - 1} were not.")
    return text, (paths[0] if paths else None), notices


def _settings(max_new_tokens, temperature, top_p) -> GenerationSettings:
    """Never raises: a value that cannot be used is refused in the chat (`GenerationSettings.problem`)."""
    return GenerationSettings.from_values(max_new_tokens, temperature, top_p)


def _still_wanted(request: gr.Request | None, demo_queue: Callable) -> Callable[[], bool]:
    """Whether the client of this request is still there: False once Gradio has marked its running event dead
    (the client cancelled or its event stream closed)."""
    session = getattr(request, "session_hash", None)

    def wanted() -> bool:
        queue = demo_queue()
        jobs = getattr(queue, "active_jobs", None) or []
        events = [event for job in jobs if job for event in job if getattr(event, "session_hash", None) == session]
        return not events or any(getattr(event, "alive", True) for event in events)

    return wanted


def _textbox(busy: bool, **update) -> gr.MultimodalTextbox:
    """While an answer streams, the textbox's submit button becomes a stop button."""
    if busy:
        return gr.MultimodalTextbox(value=None, interactive=False, submit_btn=False, stop_btn=True)
    return gr.MultimodalTextbox(interactive=True, submit_btn=True, stop_btn=False, **update)


WHOLE_ANSWER = -1  # the token choice that scores every token of the answer
START = "_Ask a question about an image: this panel then shows the answer's numbers and pictures._"
STOPPED = "_The answer was stopped before it finished, so there is nothing to show for it. Ask again to see it._"
BUSY = "_Answering…_"


def _blank_panels(note: str) -> tuple:
    """The panels with nothing to show, and `note` where words go: the start state, while answering, stopped."""
    return (None, note, None, None, note, None, None, None, note, note, "", _token_choices([]))


def _token_choices(tokens: Sequence[str]) -> gr.Dropdown:
    choices = [("the whole answer", WHOLE_ANSWER)] + [(f"token {i + 1}: {t!r}", i) for i, t in enumerate(tokens)]
    return gr.Dropdown(choices=choices, value=WHOLE_ANSWER)


# --- layout -------------------------------------------------------------------------------------------------
def _chat_column(engine: ChatEngine, examples: Sequence[Example]) -> SimpleNamespace:
    """The chat, its textbox, the examples and the generation settings."""
    chatbot = gr.Chatbot(label="Chat", height=560, buttons=["copy"], placeholder="Ask about an image.", elem_id="chat")
    textbox = gr.MultimodalTextbox(
        file_types=["image"],
        file_count="single",
        sources=["upload"],
        placeholder="Attach an image (clip icon) and ask about it, or ask a follow-up",
        show_label=False,
    )
    if examples:
        gr.Examples(
            examples=[[{"text": e.question, "files": [str(e.image)]}] for e in examples],
            inputs=[textbox],
            example_labels=[f"{e.question} (expected: {e.answer})" for e in examples],
            label="ShapesWorld examples: click one to put its picture and question in the box, then press Enter",
        )
    with gr.Accordion("Generation settings", open=False):
        max_new_tokens = gr.Slider(
            1, engine.max_new_tokens, value=engine.max_new_tokens, step=1, label="Max new tokens"
        )
        temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)")
        top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top-p (with temperature > 0)")
    return SimpleNamespace(chatbot=chatbot, textbox=textbox, settings=[max_new_tokens, temperature, top_p])


def _map(label: str, elem_id: str, height: int = VIEW_SIZE) -> gr.Image:
    """A picture drawn over the image the model saw; its title is in the text above it (a label would hide the
    top-left patch)."""
    return gr.Image(
        label=label, show_label=False, format="png", interactive=False, height=height, elem_id=elem_id, buttons=[]
    )


FUSION_TAB = {"cross_attention": "Fusion: attention", "concat_mlp": "Fusion: mixing", "none": "Fusion: none"}


def _panel_tabs(engine: ChatEngine) -> SimpleNamespace:
    """The tabs beside the chat: where the answer came from, shortcuts, fusion, shortcut switches, cost."""
    labels, fused, side = engine.shortcut_labels, engine.fused_layers, engine.config.patches_per_side
    with gr.Tab("Where the answer came from", elem_id="relevance-panel"):
        gr.Markdown(
            "Which parts of the picture the answer rests on, drawn over the picture as the model sees it "
            "(padded to a square)."
        )
        token = gr.Dropdown(
            choices=[("the whole answer", WHOLE_ANSWER)], value=WHOLE_ANSWER, label="For which part of the answer"
        )
        relevance_row = _map("Relevance maps", "relevance", height=VIEW_SIZE // 2 + 130)
        relevance_note = gr.Markdown(START)
    with gr.Tab("Shortcuts"):
        chart = gr.Image(label="Shortcut chart", show_label=False, format="png", interactive=False, elem_id="chart")
        gr.Markdown(
            "Each bar: how much one shortcut changes what the language model holds at the image, on average "
            "(0: nothing; 1: as large as what is already there). <sub>mean ‖added‖ / ‖hidden‖ at image tokens</sub>"
        )
        shortcut = gr.Dropdown(
            choices=list(zip(labels, range(len(labels)))),
            value=0 if labels else None,
            label="Shortcut to map over the image",
        )
        shortcut_map = _map("|added| / |hidden| per image patch", "shortcut-map")
        shortcut_note = gr.Markdown(START)
    with gr.Tab(FUSION_TAB[engine.config.fusion]):
        fusion_row = _map("One map per fused vision layer", "fusion-row", height=VIEW_SIZE // 2 + 60)
        layer = gr.Dropdown(
            choices=[(f"vision layer {v}", v) for v in fused], value=fused[-1], label="Fused vision layer"
        )
        gr.Markdown("**Click a patch** on the left map; the right one shows what that patch takes in.")
        with gr.Row():
            picker = _map("The chosen layer's map (click a patch)", "patch-picker", height=VIEW_SIZE // 2 + 60)
            query_map = _map("What the chosen patch takes in", "query-map", height=VIEW_SIZE // 2 + 60)
        with gr.Row():
            row = gr.Slider(0, side - 1, value=0, step=1, label="Patch row", elem_id="patch-row")
            col = gr.Slider(0, side - 1, value=0, step=1, label="Patch column", elem_id="patch-col")
        fusion_note = gr.Markdown(START)
    with gr.Tab("Switches"):
        gr.Markdown(
            "Make each shortcut weaker or stronger (0 switches it off, 1 is as trained) and answer the latest "
            "question again, to see what each shortcut is needed for."
        )
        scales = [gr.Slider(0, 2, value=1, step=0.05, label=label) for label in labels]
        with gr.Row():
            compare_button = gr.Button("Regenerate with these scales", variant="primary")
            reset_button = gr.Button("Reset scales to 1")
        with gr.Row():
            original = gr.Textbox(label="Answer (trained shortcuts)", lines=4, interactive=False)
            modified = gr.Textbox(label="Answer (these scales)", lines=4, interactive=False)
        logprob = gr.Markdown()
    with gr.Tab("Cost"):
        cost = gr.Markdown(START, elem_id="cost")
    return SimpleNamespace(
        shortcut=shortcut,
        layer=layer,
        row=row,
        col=col,
        token=token,
        picker=picker,
        query_map=query_map,
        scales=scales,
        compare_button=compare_button,
        reset_button=reset_button,
        original=original,
        modified=modified,
        logprob=logprob,
        selection=[shortcut, layer, row, col, token],
        outputs=[
            relevance_row,
            relevance_note,
            chart,
            shortcut_map,
            shortcut_note,
            fusion_row,
            picker,
            query_map,
            fusion_note,
            cost,
            original,
            token,
        ],  # as `_blank_panels` and `show_panels` return them
    )


def _api_components(engine: ChatEngine) -> SimpleNamespace:
    """Hidden plumbing for the API endpoints (as gr.ChatInterface does for its /chat)."""
    with gr.Group(visible=False):
        chat_button, visualize_button = gr.Button("chat"), gr.Button("visualize")
        reply = gr.Textbox(label="reply")
        shortcut = gr.Number(0, precision=0, label="shortcut")
        layer = gr.Number(engine.fused_layers[-1], precision=0, label="vision_layer")
        row, col = gr.Number(0, precision=0, label="row"), gr.Number(0, precision=0, label="col")
        images = [gr.Image(format="png", label=name) for name in ("chart", "shortcut_map", "fusion_map", "query_map")]
        info = gr.JSON(label="info")
    return SimpleNamespace(
        chat_button=chat_button,
        visualize_button=visualize_button,
        reply=reply,
        inputs=[shortcut, layer, row, col],
        outputs=[*images, info],
    )


# --- what the events do -------------------------------------------------------------------------------------
def _token(choice) -> int | None:
    return None if choice is None or int(choice) == WHOLE_ANSWER else int(choice)


def show_panels(state: ChatSession, k: int | None, vision_layer: int, r: float, c: float, token=WHOLE_ANSWER) -> tuple:
    """The panels for the latest answer (its relevance as far as it has been worked out); the token choice
    is left as it is."""
    answer = state.last_answer
    if answer is None:
        if not state.turns:
            note = START
        elif state.turns[-1].status == "failed":
            note = "_The latest question got no answer, so there is nothing to show._"
        else:
            note = NO_IMAGE
        return _blank_panels(note)[:-1] + (gr.skip(),)
    relevance = answer.relevance.get(_token(token))
    visuals: Visuals = render_visuals(answer, k or 0, vision_layer, int(r), int(c), relevance)
    return (
        visuals.relevance_row,
        visuals.relevance_note,
        visuals.chart,
        visuals.shortcut_panel,
        visuals.shortcut_note,
        visuals.fusion_row,
        visuals.patch_picker,
        visuals.query_panel,
        visuals.fusion_note,
        answer.cost.markdown(),
        answer.text,
        gr.skip(),
    )


def stream_turns(
    engine: ChatEngine, state: ChatSession, turns: Iterator, k, vision_layer, r, c, token
) -> Iterator[tuple]:
    skip = tuple(gr.skip() for _ in range(PANELS))
    with closing(turns):  # closing it on stop stops generate
        for index, _ in enumerate(turns):
            yield state.transcript(), state, *(_blank_panels(BUSY) if index == 0 else skip)
    answer = state.last_answer
    if answer is None:
        yield state.transcript(), state, *show_panels(state, k, vision_layer, r, c)
        return
    tokens = _token_choices(engine.answer_tokens(answer))
    yield state.transcript(), state, *show_panels(state, k, vision_layer, r, c)[:-1], tokens
    engine.relevance(answer)  # one more pass: where the whole answer came from
    yield state.transcript(), state, *show_panels(state, k, vision_layer, r, c)


PANELS = 12  # the length of `_blank_panels` and `show_panels`


def take_message(message: dict, state: ChatSession) -> tuple:
    text, path, _ = _message_parts(message)
    shown = ([{"path": path}] if path else []) + ([text] if isinstance(text, str) and text else [])
    preview = [*state.transcript(), {"role": "user", "content": shown}]
    pending = {**(message or {}), "turns_before": len(state.turns)}  # to tell a refused request from a stopped one
    return pending, _textbox(busy=True), preview


def give_back(message: dict | None, state: ChatSession) -> tuple:
    """The request did not finish. If it never ran (Gradio refused it: the queue was full), the question goes
    back in the textbox and the chat drops its preview; the page shows Gradio's "busy" message. If it ran and
    was stopped, the textbox stays empty: the stopped turn is in the chat."""
    ran = message is not None and len(state.turns) > message.get("turns_before", len(state.turns))
    if message is None or ran:
        return state.transcript(), _textbox(busy=False)
    question = {key: value for key, value in message.items() if key != "turns_before"}
    return state.transcript(), _textbox(busy=False, value=question)


def stopped(state: ChatSession) -> tuple:
    """After stop: the chat with the stopped turn, an empty textbox, and panels that say it was stopped."""
    return state.transcript(), _textbox(busy=False, value=None), *_blank_panels(STOPPED)


def _model_handlers(engine: ChatEngine, uploads: Uploads, queue: Callable) -> SimpleNamespace:
    """The events that use `engine`: those that run the model (each under `gpu`), and those that need its shape.
    The uploads of a message are held while its request runs and deleted after it (`Uploads.claimed`)."""
    side = engine.config.patches_per_side

    def holding(message) -> ExitStack:
        stack = ExitStack()
        for path in _file_paths(message):
            stack.enter_context(uploads.claimed(path))
        return stack

    @gpu
    def respond(
        message: dict,
        state: ChatSession,
        n: float,
        t: float,
        p: float,
        k,
        vision_layer,
        r,
        c,
        token,
        request: gr.Request,
    ):
        text, path, notices = _message_parts(message)
        with holding(message):
            wanted = _still_wanted(request, queue)
            turns = state.ask(engine, text, path, _settings(n, t, p), notices, wanted)
            yield from stream_turns(engine, state, turns, k, vision_layer, r, c, token)

    @gpu
    def retry(state: ChatSession, n: float, t: float, p: float, k, vision_layer, r, c, token):
        yield from stream_turns(engine, state, state.retry(engine, _settings(n, t, p)), k, vision_layer, r, c, token)

    def clear(state: ChatSession) -> tuple:
        state.clear()
        return state, *_blank_panels(START)

    def select_patch(state: ChatSession, k, vision_layer, token, event: gr.SelectData) -> tuple:
        r, c = patch_at(event.index[0], event.index[1], VIEW_SIZE, side)
        return r, c, *show_panels(state, k, vision_layer, r, c, token)

    @gpu
    def choose_token(state: ChatSession, k, vision_layer, r, c, token) -> tuple:
        """Where the chosen answer token came from: one more pass for a token not yet worked out."""
        if state.last_answer is not None:
            engine.relevance(state.last_answer, _token(token))
        return show_panels(state, k, vision_layer, r, c, token)

    @gpu
    def compare(state: ChatSession, *values: float):
        if state.last_answer is None:
            yield "", "", "_Ask a question first._"
            return
        with closing(state.compare(engine, [float(v) for v in values])) as updates:
            for comparison in updates:
                yield comparison.original, comparison.modified, comparison.markdown()

    @gpu
    def visualize(
        state: ChatSession, shortcut: float, vision_layer: float, row: float, col: float
    ) -> tuple[np.ndarray | None, ...]:
        """The pictures behind the latest answer in this chat: the shortcut chart, the chosen shortcut's
        map, the fused layer's attention map, the low-res patch (row, col)'s map, and a JSON of the numbers, with
        the relevance of each image token and high-res token to the whole answer (one more pass, once)."""
        answer = state.last_answer
        relevance = None if answer is None else engine.relevance(answer)
        visuals = render_visuals(answer, int(shortcut), int(vision_layer), int(row), int(col), relevance)
        info = {**visuals.summary, "notes": [visuals.relevance_note, visuals.shortcut_note, visuals.fusion_note]}
        return visuals.chart, visuals.shortcut_map, visuals.fusion_map, visuals.query_map, info

    @gpu
    def chat(
        message: dict, state: ChatSession, max_new_tokens: float, temperature: float, top_p: float, request: gr.Request
    ):
        """Ask a question (`message` = {"text": ..., "files": [image]}); streams the reply. Follow-ups in the
        same client session keep the conversation; a new image starts a new image context."""
        text, path, notices = _message_parts(message)
        settings, wanted = _settings(max_new_tokens, temperature, top_p), _still_wanted(request, queue)
        with holding(message), closing(state.ask(engine, text, path, settings, notices, wanted)) as turns:
            for turn in turns:
                yield turn.reply(), state

    return SimpleNamespace(
        respond=respond,
        retry=retry,
        clear=clear,
        select_patch=select_patch,
        choose_token=choose_token,
        visualize=visualize,
        compare=compare,
        chat=chat,
    )


# --- wiring -------------------------------------------------------------------------------------------------
PRIVATE = {"api_visibility": "private"}
# Textbox updates skip the queue and show no progress overlay: it would cover the stop button.
INSTANT = {"queue": False, "show_progress": "hidden", **PRIVATE}
MODEL_EVENT = {"concurrency_id": MODEL_EVENTS, "concurrency_limit": 1, "show_progress": "minimal", **PRIVATE}


def _wire_chat(chat: SimpleNamespace, panels: SimpleNamespace, handlers: SimpleNamespace, session, pending) -> None:
    """Submit, stop, retry, clear."""
    chatbot, textbox, settings = chat.chatbot, chat.textbox, chat.settings
    inputs, outputs = [session, *settings, *panels.selection], [chatbot, session, *panels.outputs]
    submitted = textbox.submit(take_message, [textbox, session], [pending, textbox, chatbot], **INSTANT)
    answered = submitted.then(handlers.respond, [pending, *inputs], outputs, **MODEL_EVENT)
    answered.then(lambda: _textbox(busy=False), None, textbox, **INSTANT)
    # .then does not run after a failed event (a full queue): give the question back instead.
    answered.failure(give_back, [pending, session], [chatbot, textbox], **INSTANT)
    retried = chatbot.retry(lambda: _textbox(busy=True), None, textbox, **INSTANT).then(
        handlers.retry, inputs, outputs, **MODEL_EVENT
    )
    retried.then(lambda: _textbox(busy=False), None, textbox, **INSTANT)
    retried.failure(lambda state: give_back(None, state), [session], [chatbot, textbox], **INSTANT)
    textbox.stop(None, None, None, cancels=[answered, retried], **PRIVATE).then(
        stopped, [session], [chatbot, textbox, *panels.outputs], **INSTANT
    )
    chatbot.clear(handlers.clear, [session], [session, *panels.outputs], **PRIVATE)


def _wire_panels(panels: SimpleNamespace, handlers: SimpleNamespace, session) -> None:
    """Choosing what the panels show, and the shortcut switches."""
    for control in (panels.shortcut, panels.layer):
        control.input(show_panels, [session, *panels.selection], panels.outputs, **PRIVATE)
    for control in (panels.row, panels.col):
        control.release(show_panels, [session, *panels.selection], panels.outputs, **PRIVATE)
    panels.picker.select(
        handlers.select_patch,
        [session, panels.shortcut, panels.layer, panels.token],
        [panels.row, panels.col, *panels.outputs],
        **PRIVATE,
    )
    panels.token.input(handlers.choose_token, [session, *panels.selection], panels.outputs, **MODEL_EVENT)
    answers = [panels.original, panels.modified, panels.logprob]
    panels.compare_button.click(handlers.compare, [session, *panels.scales], answers, **MODEL_EVENT)
    panels.reset_button.click(lambda: [1.0] * len(panels.scales), None, panels.scales, **PRIVATE)


def _wire_api(api: SimpleNamespace, chat: SimpleNamespace, handlers: SimpleNamespace, session) -> None:
    """The /chat and /visualize endpoints."""
    api.chat_button.click(
        handlers.chat,
        [chat.textbox, session, *chat.settings],
        [api.reply, session],
        api_name="chat",
        concurrency_id=MODEL_EVENTS,
        concurrency_limit=1,
    )
    api.visualize_button.click(
        handlers.visualize,
        [session, *api.inputs],
        api.outputs,
        api_name="visualize",
        concurrency_id=MODEL_EVENTS,
        concurrency_limit=1,
    )


def _queued_requests_name(demo: gr.Blocks, path: str) -> bool:
    """Whether a request waiting in the demo's queue names the file `path` (another client's upload of the same
    content is the same file)."""
    queue = getattr(demo, "_queue", None)
    waiting = getattr(queue, "event_queue_per_concurrency_id", {}) or {}
    for line in list(waiting.values()):
        for event in list(getattr(line, "queue", [])):
            data = getattr(event, "data", None)
            if data is not None and path in repr(getattr(data, "data", data)):
                return True
    return False


def _close_session(session) -> None:
    if isinstance(session, ChatSession):
        session.close()


def _end_sessions_of_closed_pages(demo: gr.Blocks) -> None:
    """A page that closes ends its chat at once (Gradio would keep a closed page's state for an hour)."""

    def end(request: gr.Request) -> None:
        holder = getattr(demo, "state_holder", None)
        if holder is not None and request is not None and request.session_hash:
            holder.delete_state(request.session_hash)

    demo.unload(end)


def build_demo(engine: ChatEngine, examples: Sequence[Example] = (), session_ttl: float = SESSION_TTL_S) -> gr.Blocks:
    """The demo's Blocks for `engine` (one shared model) with clickable `examples`; a chat idle for
    `session_ttl` seconds expires. `demo.uploads` is the upload folder's keeper, which `launch` starts."""
    previews = str(Path(get_upload_folder()).resolve() / PREVIEWS)
    with gr.Blocks(title="SparseCut demo") as demo:
        session = gr.State(ChatSession(preview_dir=previews), time_to_live=session_ttl, delete_callback=_close_session)
        pending = gr.State(None)  # the submitted message, saved while the textbox is cleared
        gr.Markdown(HEADER)
        gr.Markdown(f"**Model**: {engine.describe()}")
        if engine.world_check is not None:
            gr.Markdown(
                f"This model was trained only on {engine.world_check.world}. Ask about any picture, but for one "
                "that is not such a scene the chat says so: its answers there are guesses."
                + (" Without a picture it answers as its base LLM." if engine.config.lora_needs_image else "")
            )
        for notice in engine.notices:
            gr.Markdown(f"⚠️ {notice}")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                chat = _chat_column(engine, examples)
            with gr.Column(scale=6):
                panels = _panel_tabs(engine)
        api = _api_components(engine)
        demo.uploads = Uploads(
            get_upload_folder(),
            keep=lambda: {path for block in demo.blocks.values() for path in getattr(block, "keep_in_cache", ())},
            wanted=lambda path: _queued_requests_name(demo, path),
        )
        handlers = _model_handlers(engine, demo.uploads, lambda: getattr(demo, "_queue", None))
        _wire_chat(chat, panels, handlers, session, pending)
        _wire_panels(panels, handlers, session)
        _wire_api(api, chat, handlers, session)
        _end_sessions_of_closed_pages(demo)
    return demo


def launch(
    demo: gr.Blocks,
    host: str | None = None,
    port: int | None = None,
    share: bool = False,
    max_queue: int = MAX_QUEUE,
    max_upload: str | int = MAX_UPLOAD,
    max_request: int = MAX_REQUEST_BYTES,
    max_sessions: int = MAX_SESSIONS,
    file_max_age: float = FILE_MAX_AGE_S,
    **kwargs,
):
    """Queue and serve the demo with its limits: one generation at a time (MODEL_EVENTS), `max_queue` requests
    waiting (one more is refused at once with HTTP 503, which the page shows as "This application is currently
    busy"), uploads up to `max_upload` per file ("10mb", or bytes; larger ones get HTTP 413) and `max_request`
    bytes per request in all (HTTP 413), `max_sessions` chats in memory (the least recently used is dropped), and
    files no request holds and no chat shows deleted after `file_max_age` seconds. Only Gradio's own files,
    uploads and the example scenes are served. host/port None: Gradio's defaults (127.0.0.1:7860, or the
    GRADIO_SERVER_NAME / GRADIO_SERVER_PORT a host such as Spaces sets). Returns what `gr.Blocks.launch`
    returns."""
    demo.queue(max_size=max_queue, default_concurrency_limit=2)
    uploads = getattr(demo, "uploads", None)
    if uploads is not None:
        uploads.max_age = file_max_age
        uploads.start()
    app_kwargs = kwargs.pop("app_kwargs", None) or {}
    app_kwargs.setdefault("middleware", []).append(Middleware(RequestSizeLimit, max_bytes=max_request))
    return demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=max_upload,
        allowed_paths=[str(EXAMPLES_DIR)],
        show_error=False,  # exceptions stay in the terminal's log; the page shows the chat's messages
        footer_links=["api", "gradio"],
        state_session_capacity=max_sessions,
        app_kwargs=app_kwargs,
        **kwargs,
    )
