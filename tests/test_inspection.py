"""demo.engine and sparsecut.inspection: grid mappings with known answers, pictures, log-probabilities, prompts,
sessions."""

import gc
import importlib
import logging
import math
import weakref

import numpy as np
import pytest
import torch
from conftest import random_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from demo import engine as engine_module
from demo.engine import (
    Answer,
    ChatEngine,
    ChatSession,
    Cost,
    Exchange,
    GenerationSettings,
    Prompt,
    PromptTooLongError,
    default_quantization,
    error_message,
    sequence_logprob,
    to_messages,
)
from sparsecut.inspection import (
    CHART_SIZE,
    VIEW_SIZE,
    Relevance,
    high_res_to_grid,
    neighbours_to_grid,
    overlay,
    patch_at,
    render_visuals,
    shortcut_chart,
)
from sparsecut.inspection.visuals import TILE_SIZE
from sparsecut.modeling import ShortcutStats
from sparsecut.testing import tiny_model

SETTINGS = GenerationSettings(max_new_tokens=6)
build_module = importlib.import_module("sparsecut.build")  # `sparsecut.build` the attribute is the function


@pytest.fixture(scope="module")
def engine() -> ChatEngine:
    model, processor = tiny_model()
    return ChatEngine(model, processor, max_new_tokens=32)


def ask(session: ChatSession, engine: ChatEngine, question: str, image=None, settings=SETTINGS):
    *_, turn = session.ask(engine, question, image, settings)
    return turn


# --- mapping fusion outputs onto the image ------------------------------------------------------------------
def test_high_res_to_grid_places_each_key_where_its_crop_and_patch_are():
    side, grid = 3, 2
    keys = np.arange(grid * grid * side * side)
    placed = high_res_to_grid(keys, side, grid)
    assert placed.shape == (grid * side, grid * side)
    for cy in range(grid):
        for cx in range(grid):
            for row in range(side):
                for col in range(side):
                    key = (cy * grid + cx) * side * side + row * side + col
                    assert placed[cy * side + row, cx * side + col] == key


def test_high_res_to_grid_finds_a_hand_made_attention_peak():
    side, grid = 4, 2
    attention = np.full((side * side, grid * grid * side * side), 0.01)  # (queries, keys)
    crop, row, col = 2, 1, 3  # crop 2 = bottom-left: (cy, cx) = (1, 0)
    attention[5, crop * side * side + row * side + col] = 5.0
    received = high_res_to_grid(attention.sum(axis=0), side, grid)
    assert np.unravel_index(received.argmax(), received.shape) == (1 * side + row, 0 * side + col)


def test_neighbours_to_grid_inverts_the_fusions_neighbour_gathering():
    model, _ = tiny_model(fusion="concat_mlp")
    side, grid = model.config.patches_per_side, model.config.high_res_grid
    # High-res crops whose single feature is the token's index on the whole image's grid.
    whole = torch.arange(float((grid * side) ** 2)).view(grid * side, grid * side)
    crops = torch.stack(
        [whole[cy * side : (cy + 1) * side, cx * side : (cx + 1) * side] for cy in range(grid) for cx in range(grid)]
    )
    neighbours = model.fusion.neighbours(crops.reshape(1, grid * grid, side * side, 1))[0, ..., 0]  # (P, G)
    assert np.array_equal(neighbours_to_grid(neighbours.numpy(), side, grid), whole.numpy())


def test_patch_at_maps_view_pixels_to_low_res_patches():
    assert patch_at(0, 0, VIEW_SIZE, 4) == (0, 0)
    assert patch_at(VIEW_SIZE - 1, 100, VIEW_SIZE, 4) == (1, 3)
    assert patch_at(VIEW_SIZE + 50, -3, VIEW_SIZE, 4) == (0, 3)  # clamped


# --- pictures -----------------------------------------------------------------------------------------------
def test_overlay_has_the_view_size_and_shows_the_map():
    image = Image.new("RGB", (50, 50), (128, 128, 128))
    values = np.zeros((4, 4))
    values[1, 2] = 1.0
    picture = overlay(image, values)
    assert picture.shape == (VIEW_SIZE, VIEW_SIZE, 3) and picture.dtype == np.uint8
    cell = VIEW_SIZE // 4
    hot = picture[cell + cell // 2, 2 * cell + cell // 2]
    cold = picture[cell // 2, cell // 2]
    assert np.abs(hot.astype(int) - cold.astype(int)).sum() > 100


def test_overlay_of_a_constant_map_is_the_image_tinted_evenly():
    picture = overlay(Image.new("RGB", (20, 30), (10, 200, 30)), np.full((3, 3), 7.0))
    assert picture.std(axis=(0, 1)).max() < 1e-6


def hand_made_stats(side: int = 4, grid: int = 2, fusion: str = "cross_attention") -> ShortcutStats:
    layers = [0, 2]
    ratios = torch.linspace(0.1, 0.9, 2 * side * side).view(2, 1, side * side)
    attention = contribution = None
    if fusion == "cross_attention":
        attention = torch.full((2, 1, side * side, grid * grid * side * side), 1e-3)
        attention[..., 0] = 1.0  # every query looks at the top-left high-res token
        attention /= attention.sum(-1, keepdim=True)
    elif fusion == "concat_mlp":
        contribution = torch.softmax(torch.randn(2, 1, side * side, 1 + grid * grid), dim=-1)
    return ShortcutStats(
        vision_layers=[0, 2],
        llm_layers=[1, 3],
        fused_layers=layers,
        patches_per_side=side,
        high_res_grid=grid,
        ratios=ratios,
        fusion_attention=attention,
        fusion_contribution=contribution,
    )


def hand_made_answer(stats: ShortcutStats | None) -> Answer:
    cost = Cost(30, 16, 4, 0.5, 10.0, 2**20, "peak process RSS", "none", "cpu", 30, 94)
    prompt = Prompt(messages=[], inputs={"input_ids": torch.zeros(1, 30, dtype=torch.long)}, image=None)
    return Answer("red", [1, 2], prompt, SETTINGS, stats, cost, view=random_image(0, 64, 64))


def test_chart_has_its_size_and_highlights_the_selected_shortcut():
    chart = shortcut_chart(hand_made_stats(), selected=1)
    assert chart.shape == (CHART_SIZE[1], CHART_SIZE[0], 3) and chart.dtype == np.uint8
    assert chart.std() > 0
    orange = np.all(chart == (230, 120, 30), axis=-1)
    blue = np.all(chart == (60, 110, 180), axis=-1)
    assert orange.sum() > 100 and blue.sum() > 100
    # Shortcut 1's mean ratio is the larger one, so its (orange) bar is the longer.
    assert np.nonzero(orange)[1].max() > np.nonzero(blue)[1].max()


def test_render_visuals_for_cross_attention_shows_where_queries_looked():
    visuals = render_visuals(hand_made_answer(hand_made_stats()), shortcut=1, vision_layer=2, row=1, col=1)
    for picture in (visuals.shortcut_map, visuals.fusion_map, visuals.query_map):
        assert picture.shape == (VIEW_SIZE, VIEW_SIZE, 3) and picture.std() > 0
    assert [v for v, _ in visuals.fusion_maps] == [0, 2]
    assert visuals.summary["vision_layer"] == 2 and visuals.summary["patch"] == [1, 1]
    assert visuals.summary["shortcuts"][1]["mean_ratio"] == pytest.approx(
        float(torch.linspace(0.1, 0.9, 32)[16:].mean())
    )
    # All attention goes to the top-left high-res token: the top-left cell of the 8x8 grid is the brightest.
    cell = VIEW_SIZE // 8
    brightness = visuals.fusion_map.astype(int).sum(-1)
    assert brightness[cell // 2, cell // 2] > brightness[VIEW_SIZE - cell // 2, VIEW_SIZE - cell // 2]
    assert "0%" in visuals.fusion_note  # patch (1, 1) puts (almost) none of its attention on its own area


def test_render_visuals_for_other_fusions_and_text_only_answers():
    concat = render_visuals(hand_made_answer(hand_made_stats(fusion="concat_mlp")), row=3, col=0)
    assert concat.query_map.shape == (VIEW_SIZE, VIEW_SIZE, 3) and len(concat.summary["patch_shares"]) == 5
    assert "concat-MLP" in concat.fusion_note
    none = render_visuals(hand_made_answer(hand_made_stats(fusion="none")))
    assert none.fusion_maps == [] and "does not fuse the high-res view" in none.fusion_note
    text_only = render_visuals(hand_made_answer(None))
    assert text_only.chart is None and "no image" in text_only.fusion_note


def test_fusion_maps_sit_in_one_row_with_colour_bars_and_attention_is_named_only_where_it_is():
    for fusion, layers in (("cross_attention", 2), ("concat_mlp", 2)):
        visuals = render_visuals(hand_made_answer(hand_made_stats(fusion=fusion)))
        row = visuals.fusion_row
        assert row.shape[1] >= layers * TILE_SIZE  # every layer's map side by side
        assert row.shape[0] < 2 * TILE_SIZE  # ... in one row, not wrapped onto a second
        assert visuals.shortcut_panel.shape[0] > VIEW_SIZE and visuals.query_panel.shape[0] > VIEW_SIZE  # colour bars
        says_attention = "attention" in visuals.fusion_note.lower().split("<sub>")[0]
        assert says_attention == (fusion == "cross_attention")
        assert "How to read this" in visuals.relevance_note or "once the answer is complete" in visuals.relevance_note


def test_clicking_another_patch_changes_the_concat_mlp_patch_picture():
    answer = hand_made_answer(hand_made_stats(fusion="concat_mlp"))
    first, second = render_visuals(answer, row=0, col=0), render_visuals(answer, row=2, col=3)
    assert np.abs(first.query_map.astype(int) - second.query_map.astype(int)).mean() > 5
    assert first.summary["patch_shares"] != second.summary["patch_shares"]


def test_relevance_maps_are_drawn_over_the_view_with_their_colour_bars():
    side, grid = 4, 2
    image = torch.zeros(1, side * side)
    image[0, 5] = 3.0  # patch (1, 1)
    high = torch.zeros(2, 1, grid * grid * side * side)
    high[0, 0, 0] = -2.0  # crop (0, 0), patch (0, 0): the top-left high-res token; negative still counts
    relevance = Relevance(
        image=image,
        shortcuts=torch.zeros(2, 1, side * side),
        high_res=high,
        logprob=torch.tensor([-1.5]),
        fused_layers=[0, 2],
        vision_layers=[0, 2],
        patches_per_side=side,
        high_res_grid=grid,
    )
    visuals = render_visuals(hand_made_answer(hand_made_stats()), relevance=relevance)
    (low_name, low), (high_name, high_map) = visuals.relevance_maps
    assert (low_name, high_name) == ("image tokens", "high-res tokens")
    cell = VIEW_SIZE // side
    brightness = low.astype(int).sum(-1)
    assert brightness[cell + cell // 2, cell + cell // 2] > brightness[cell // 2, cell // 2] + 100
    fine = VIEW_SIZE // (side * grid)
    brightness = high_map.astype(int).sum(-1)
    assert brightness[fine // 2, fine // 2] > brightness[VIEW_SIZE - fine // 2, VIEW_SIZE - fine // 2] + 100
    assert visuals.relevance_row.shape[1] > visuals.relevance_row.shape[0]  # side by side
    assert visuals.summary["relevance"]["image_tokens"][1][1] == 3.0
    assert "row 1, column 1" in visuals.relevance_note


def test_the_cost_says_why_the_token_counts_match_llava():
    cost = hand_made_answer(hand_made_stats()).cost.markdown()
    assert "as many tokens as LLaVA-1.5" in cost and "appending the high-res tokens instead" in cost


def test_the_engine_works_out_relevance_once_per_answer_and_token(engine, monkeypatch):
    session = ChatSession()
    ask(session, engine, "What is it?", random_image(3))
    answer = session.last_answer
    tokens = engine.answer_tokens(answer)
    whole = engine.relevance(answer)
    assert whole is not None and whole.image.shape == (1, engine.config.patches_per_side**2)
    calls = []
    monkeypatch.setattr(engine_module, "relevance_of_answer", lambda *args: calls.append(args))
    assert engine.relevance(answer) is whole and calls == []  # kept on the answer: no second pass
    monkeypatch.undo()
    first = engine.relevance(answer, token=0)
    assert first is not None and answer.relevance[0] is first
    if len(tokens) > 1:  # one token's relevance is not the whole answer's
        assert not torch.equal(first.image, whole.image)
    assert engine.relevance(answer, token=len(tokens)) is None  # no such token
    text_only = ChatSession()
    ask(text_only, engine, "Hello?")
    assert engine.relevance(text_only.last_answer) is None


# --- log-probabilities --------------------------------------------------------------------------------------
def test_sequence_logprob_of_hand_made_logits():
    logits = torch.zeros(3, 4)  # uniform over 4 tokens
    logits[2, 1] = math.log(3.0)  # token 1 at position 2: probability 3/6
    assert sequence_logprob(logits, torch.tensor([0, 3, 1])) == pytest.approx(2 * math.log(1 / 4) + math.log(1 / 2))


def test_answer_logprob_is_the_teacher_forced_score_of_the_generated_tokens(engine):
    session = ChatSession()
    ask(session, engine, "What is it?", random_image(1))
    answer = session.last_answer
    trained = engine.answer_logprob(answer)
    assert trained == pytest.approx(engine.answer_logprob(answer, [1.0, 1.0, 1.0]), abs=1e-5)
    assert trained != pytest.approx(engine.answer_logprob(answer, [0.0, 0.0, 0.0]), abs=1e-4)
    # Greedy decoding picked each token as the argmax of the same distribution the score reads.
    ids = torch.cat([answer.prompt.inputs["input_ids"], torch.tensor([answer.token_ids])], dim=1)
    with torch.no_grad():
        logits = engine.model(input_ids=ids, pixel_values=answer.prompt.inputs["pixel_values"]).logits
    assert logits[0, answer.prompt.length - 1 : -1].argmax(-1).tolist() == answer.token_ids


def test_comparison_regenerates_and_reports_the_change(engine):
    session = ChatSession()
    ask(session, engine, "What is it?", random_image(2))
    *_, comparison = session.compare(engine, [0.0, 1.0, 1.0])
    assert comparison.original == session.last_answer.text and comparison.tokens == len(session.last_answer.token_ids)
    change = comparison.modified_logprob - comparison.original_logprob
    assert f"{change:+.3f}" in comparison.markdown()
    *_, failed = session.compare(engine, [1.0, 2.0])  # one scale too few
    assert failed.error is not None and failed.markdown().startswith("⚠️")


# --- prompts ------------------------------------------------------------------------------------------------
def image_tokens(engine: ChatEngine, prompt: Prompt) -> int:
    return int((prompt.inputs["input_ids"] == engine.processor.image_token_id).sum())


def test_an_overlong_question_is_cut_but_its_image_tokens_are_not(engine):
    question = "Tell me about this picture. " * 40  # ~1100 byte tokens, over the tiny LLM's 512
    prompt = engine.build_prompt([Exchange(question, random_image(3))], max_new_tokens=32)
    assert prompt.length <= engine.context_length - 32
    assert image_tokens(engine, prompt) == engine.config.num_image_tokens
    assert prompt.inputs["pixel_values"].shape[0] == 1
    assert "cut short" in prompt.notices[0]


def test_old_turns_are_left_out_first_and_their_image_moves_along(engine):
    history = [Exchange("What is this? " * 12, random_image(4), "A picture. " * 12) for _ in range(1)]
    history += [Exchange("And this? " * 10, None, "Yes. " * 10) for _ in range(3)]
    prompt = engine.build_prompt([*history, Exchange("Last question?")], max_new_tokens=300)
    assert prompt.length <= engine.context_length - 300
    assert image_tokens(engine, prompt) == engine.config.num_image_tokens
    assert "left out" in prompt.notices[0] and len(prompt.notices) == 1
    assert prompt.messages[-1]["content"][-1]["text"] == "Last question?"


def test_max_new_tokens_is_capped_to_what_fits_and_generate_gets_the_cap(engine, monkeypatch):
    question = ("Describe the picture in detail, please. " * 8).strip()  # ~330 tokens: fits, a long answer does not
    prompt = engine.build_prompt([Exchange(question, random_image(5))], max_new_tokens=400)
    assert prompt.max_new_tokens == engine.context_length - prompt.length < 400
    assert prompt.messages[-1]["content"][-1]["text"] == question  # the question is kept whole
    assert len(prompt.notices) == 1 and f"limited to {prompt.max_new_tokens} new tokens" in prompt.notices[0]

    generate, asked = engine.model.generate, []
    monkeypatch.setattr(engine.model, "generate", lambda **kwargs: asked.append(kwargs) or generate(**kwargs))
    capped = ChatEngine(engine.model, engine.processor, max_new_tokens=400)
    turn = ask(ChatSession(), capped, question, random_image(5), GenerationSettings(max_new_tokens=400))
    assert turn.status == "done" and "limited to" in turn.reply()
    assert asked[0]["max_new_tokens"] == prompt.max_new_tokens


def test_a_prompt_that_cannot_fit_is_refused_and_the_hint_works(engine):
    image = random_image(5)
    tight = ChatEngine(engine.model, engine.processor, max_new_tokens=8)
    tight.context_length = engine.count_tokens(to_messages([Exchange("", image)])) + 4  # room for 4 more tokens
    with pytest.raises(PromptTooLongError, match="lower the maximum"):
        tight.build_prompt([Exchange("Hi", image)], max_new_tokens=8)
    prompt = tight.build_prompt([Exchange("Hi", image)], max_new_tokens=2)
    assert prompt.length + prompt.max_new_tokens <= tight.context_length
    assert image_tokens(tight, prompt) == engine.config.num_image_tokens


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    turns=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=4),
    image_at=st.none() | st.integers(0, 4),
    question_words=st.integers(1, 150),
    max_new_tokens=st.integers(1, 480),
)
def test_every_prompt_fits_its_answer_and_keeps_image_tokens_whole(
    engine, turns, image_at, question_words, max_new_tokens
):
    image = random_image(13)
    exchanges = [Exchange("Why? " * q, None, "Because. " * a) for q, a in turns]
    exchanges.append(Exchange("What is at the top? " * question_words))
    if image_at is not None:
        at = min(image_at, len(exchanges) - 1)
        exchanges[at] = Exchange(exchanges[at].question, image, exchanges[at].answer)
    prompt = engine.build_prompt(exchanges, max_new_tokens)

    assert 1 <= prompt.max_new_tokens <= max_new_tokens
    assert prompt.length + prompt.max_new_tokens <= engine.context_length
    assert image_tokens(engine, prompt) == (0 if image_at is None else engine.config.num_image_tokens)
    if engine.count_tokens(to_messages(exchanges)) + max_new_tokens <= engine.context_length:
        assert prompt.notices == [] and prompt.messages == to_messages(exchanges)  # what fits is left alone
    kept_whole = prompt.messages[-1]["content"][-1]["text"] == exchanges[-1].question
    assert kept_whole != any("cut short" in notice for notice in prompt.notices)
    assert (prompt.max_new_tokens < max_new_tokens) == any("limited to" in notice for notice in prompt.notices)


# --- sessions -----------------------------------------------------------------------------------------------
def test_follow_ups_keep_the_image_and_a_new_image_starts_a_new_context(engine, tmp_path):
    session = ChatSession(preview_dir=str(tmp_path / "previews"))
    path = tmp_path / "a.png"
    random_image(6).save(path)
    first = ask(session, engine, "What is it?", str(path))
    assert first.status == "done" and session.last_answer.stats is not None
    follow_up = ask(session, engine, "And its colour?")
    messages = session.last_answer.prompt.messages
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"][0]["type"] == "image" and messages[1]["content"][0]["text"] == first.answer
    assert follow_up.notices == [] and session.last_answer.stats is not None  # the image is still there
    second = ask(session, engine, "What about this one?", random_image(7))
    assert "New image" in second.notices[0]
    assert len(session.last_answer.prompt.messages) == 1 and session.context() == [second]
    shown, question = session.transcript()[0]["content"]  # a preview the chat wrote, not the upload
    assert question == "What is it?" and shown["path"].startswith(str(tmp_path / "previews"))
    assert Image.open(shown["path"]).size == Image.open(path).size  # small images are kept as they are


def test_images_of_any_mode_and_shape_are_accepted(engine):
    session = ChatSession()
    for image in (Image.new("LA", (300, 15)), Image.new("P", (5, 90)), Image.new("I;16", (40, 40), 60000)):
        assert ask(session, engine, "What is it?", image).status == "done"
        assert session.last_answer.view.size[0] == session.last_answer.view.size[1]  # padded to a square


def test_text_only_questions_work(engine):
    session = ChatSession()
    turn = ask(session, engine, "Hello?")
    assert turn.status == "done" and session.last_answer.stats is None
    assert session.last_answer.cost.image_tokens == 0


def test_cost_counts_the_alternatives_input_tokens(engine):
    session = ChatSession()
    ask(session, engine, "What is it?", random_image(8))
    cost = session.last_answer.cost
    config = engine.config
    side2, views = config.patches_per_side**2, config.num_views
    text = cost.input_tokens - cost.image_tokens
    assert cost.image_tokens == config.num_image_tokens == side2
    assert (cost.llava_input_tokens, cost.appended_input_tokens) == (text + side2, text + views * side2)
    assert cost.new_tokens == len(session.last_answer.token_ids) and cost.peak_memory_bytes > 0
    assert "tokens/s" in cost.markdown()


def test_a_bad_image_becomes_a_chat_message_and_the_conversation_survives(engine):
    session = ChatSession()
    ask(session, engine, "What is it?", random_image(9))
    bad = ask(session, engine, "And this?", np.random.default_rng(0).bytes(300))
    assert bad.status == "failed" and bad.error.startswith("⚠️ I could not use this image")
    assert "Traceback" not in bad.reply()
    after = ask(session, engine, "Still there?")
    assert after.status == "done" and session.last_answer.stats is not None  # the first image is still in context
    assert len(session.turns) == 3


def test_an_error_during_generation_becomes_a_message_and_the_next_request_works(engine, monkeypatch):
    session = ChatSession()
    ask(session, engine, "What is it?", random_image(10))
    generate = engine.model.generate
    calls = []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return generate(*args, **kwargs)

    monkeypatch.setattr(engine.model, "generate", fail_once)
    failed = ask(session, engine, "Follow-up?")
    assert failed.status == "failed" and "out of memory" in failed.reply() and "20.00 GiB" not in failed.reply()
    worked = ask(session, engine, "Follow-up again?")
    assert worked.status == "done" and len(session.last_answer.prompt.messages) == 3  # failed turn not re-sent


def test_memory_held_by_a_failed_generation_is_released_before_the_next_request(engine, monkeypatch, caplog):
    # Unlogged, so that no log record keeps the traceback (and the tensor in it) alive.
    caplog.set_level(logging.CRITICAL, logger=engine_module.logger.name)
    held = []

    def out_of_memory(**kwargs):
        activations = torch.zeros(256, 256)  # what a failed step still holds through its frame
        held.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    generate = engine.model.generate
    session = ChatSession()
    ask(session, engine, "What is it?", random_image(14))
    monkeypatch.setattr(engine.model, "generate", out_of_memory)
    gc.disable()  # only an explicit collection may free the cycle the error sits in
    try:
        failed = ask(session, engine, "Follow-up?")
        assert held[0]() is None
    finally:
        gc.enable()
    assert failed.status == "failed" and "ran out of memory" in failed.reply()
    monkeypatch.setattr(engine.model, "generate", generate)
    assert ask(session, engine, "Again?").status == "done" and session.last_answer.stats is not None


def test_an_empty_message_is_answered_with_a_hint(engine):
    turn = ask(ChatSession(), engine, "  ")
    assert turn.status == "failed" and "empty" in turn.reply()


def test_error_messages_never_show_internals():
    message = error_message(RuntimeError("/secret/path.py line 3: shape mismatch"))
    assert "RuntimeError" in message and "/secret" not in message


def test_stopping_keeps_the_partial_answer_and_stops_generation(engine, monkeypatch):
    generate, generated = engine.model.generate, []

    def counting(*args, **kwargs):
        sequences = generate(*args, **kwargs)
        generated.append(sequences.shape[1] - kwargs["input_ids"].shape[1])
        return sequences

    monkeypatch.setattr(engine.model, "generate", counting)
    session = ChatSession()
    turns = session.ask(engine, "Tell me everything.", random_image(11), GenerationSettings(max_new_tokens=32))
    next(turns)  # the pending turn
    partial = next(turns)  # after the first new token (the streamer reports every token)
    turns.close()
    assert partial.status == "stopped" and session.last_answer is None
    assert generated[0] < 32  # generate ended at the stop, not at max_new_tokens
    assert ask(session, engine, "Next?").status == "done"
    assert len(session.last_answer.prompt.messages) == 3  # the stopped turn stays in the conversation


def test_retry_replaces_the_last_answer_and_clear_forgets(engine):
    session = ChatSession()
    ask(session, engine, "What is it?", random_image(12))
    for _ in session.retry(engine, SETTINGS):
        pass
    assert len(session.turns) == 1 and session.turns[0].status == "done" and session.last_answer.stats is not None
    session.clear()
    assert session.turns == [] and session.last_answer is None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-checkpoint")
    model, processor = tiny_model()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_quantization_without_bitsandbytes_falls_back_to_none_with_a_notice(checkpoint, monkeypatch, caplog):
    find_spec = build_module.importlib.util.find_spec
    monkeypatch.setattr(
        build_module.importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else find_spec(name)
    )
    with caplog.at_level(logging.WARNING, logger=engine_module.logger.name):
        loaded = ChatEngine.load(str(checkpoint), quantization="4bit", device="cpu", max_new_tokens=4)
    assert loaded.quantization == "none" and "unquantized" in loaded.describe()
    assert len(loaded.notices) == 1 and "4bit" in loaded.notices[0] and "not installed" in loaded.notices[0]
    assert loaded.notices[0] in caplog.messages
    assert not any("bitsandbytes" in type(m).__module__ for m in loaded.model.modules())  # plain nn.Linear layers
    assert ask(ChatSession(), loaded, "What is it?", random_image(15)).status == "done"


def test_quantization_the_device_cannot_run_falls_back_to_none(checkpoint, monkeypatch):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    assert build_module.quantization_unavailable("8bit", torch.device("cpu")) is None  # works here: no fallback

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(bnb_functional, "int8_vectorwise_quant", no_kernel)
    loaded = ChatEngine.load(str(checkpoint), quantization="8bit", device="cpu", max_new_tokens=4)
    assert loaded.quantization == "none"
    assert "cannot quantize to 8bit on cpu" in loaded.notices[0] and "no kernel for this device" in loaded.notices[0]


def test_default_quantization_depends_on_the_device():
    assert default_quantization("cuda") == default_quantization("cuda:1") == "4bit"
    assert default_quantization("cpu") == "none"
