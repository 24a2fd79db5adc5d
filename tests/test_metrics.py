"""Tests of the evaluation metrics on hand-made predictions with hand-computed expected values."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparsecut.evaluation.metrics import (
    DescribedObject,
    description_metrics,
    exact_match,
    is_correct,
    normalize_answer,
    parse_description,
    parse_yes_no,
    score,
    to_markdown,
    yes_no_metrics,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Three.", "3"),
        ("  The   Top-Left ", "top left"),
        ("A red circle.", "red circle"),
        ("A", "a"),  # a lone letter is an answer, not an article
        ("the letter A", "letter a"),
        ("Yes, there is!", "yes there is"),
        ("3.5", "3.5"),
        ("twelve", "12"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@given(st.text())
def test_normalize_answer_is_idempotent(text):
    once = normalize_answer(text)
    assert normalize_answer(once) == once


def test_exact_match_and_yes_no_parsing():
    assert exact_match("Bottom-right.", "bottom right") and not exact_match("bottom", "bottom right")
    assert exact_match("four", "4") and not exact_match("40", "4")
    assert parse_yes_no("Yes, there is a red circle.") == "yes" and parse_yes_no("No.") == "no"
    assert parse_yes_no("I think so") is None and parse_yes_no("") is None
    assert is_correct("Yes, it is.", "yes") and not is_correct("yes", "no") and is_correct("Red", "red")


def test_yes_no_metrics_by_hand():
    golds = ["yes", "yes", "yes", "no", "no", "no", "no", "yes"]
    preds = ["Yes", "no", "yes.", "yes", "No", "no", "no", "maybe"]
    # TP = items 0, 2; FP = item 3; FN = items 1, 7 ("maybe" is wrong and not a yes); TN = items 4, 5, 6.
    m = yes_no_metrics(preds, golds)
    assert m["n"] == 8
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))
    assert m["yes_ratio"] == pytest.approx(3 / 8)


def test_parse_description_tolerates_case_and_whitespace_and_flags_unparsable_parts():
    text = "A Large  red striped circle with the letter K at the top left ;a small blue solid square at the center."
    assert parse_description(text) == [
        DescribedObject("large", "red", "striped", "circle", "k", "top left"),
        DescribedObject("small", "blue", "solid", "square", None, "center"),
    ]
    assert parse_description("a red circle; a small blue solid square at the center") == [
        None,
        DescribedObject("small", "blue", "solid", "square", None, "center"),
    ]
    assert parse_description("") == []


GOLD = (
    "a large red striped circle with the letter K at the top left; "
    "a small blue solid square at the center; a medium green dotted star at the bottom"
)


def test_description_metrics_by_hand():
    # Right: the circle and the square. Wrong pattern: the star. Plus one unparsable part.
    pred = (
        "a large red striped circle with the letter K at the top left; "
        "a small blue solid square at the center; "
        "a medium green solid star at the bottom; a blurry thing"
    )
    m = description_metrics([pred], [GOLD])
    assert m["precision"] == pytest.approx(2 / 4) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))
    # Ignoring pattern and character, the star is right too.
    assert m["coarse_precision"] == pytest.approx(3 / 4) and m["coarse_recall"] == pytest.approx(1.0)
    assert m["exact"] == 0.0
    assert description_metrics([GOLD.upper()], [GOLD])["exact"] == 1.0


def test_a_duplicated_object_is_only_found_once():
    pred = "a small blue solid square at the center; a small blue solid square at the center"
    m = description_metrics([pred], ["a small blue solid square at the center"])
    assert m["precision"] == pytest.approx(1 / 2) and m["recall"] == pytest.approx(1.0)


def test_score_and_markdown_by_hand():
    records = (
        [{"family": "colour", "prediction": p, "answer": "red"} for p in ("red", "Red.", "the red", "blue")]
        + [
            {"family": "existence", "prediction": p, "answer": a}
            for p, a in (("yes", "yes"), ("no", "yes"), ("no", "no"), ("yes", "no"))
        ]
        + [{"family": "description", "prediction": GOLD, "answer": GOLD}]
    )
    scores = score(records)
    assert scores["families"]["colour"] == {"n": 4, "accuracy": 0.75}
    existence = scores["families"]["existence"]
    assert existence["accuracy"] == 0.5 and existence["precision"] == 0.5 and existence["recall"] == 0.5
    assert existence["yes_ratio"] == 0.5
    assert scores["families"]["description"]["f1"] == 1.0
    # Overall accuracy covers the 8 short answers only: 3 + 2 right.
    assert scores["overall"] == {"n": 8, "accuracy": 5 / 8}

    table = to_markdown(scores).splitlines()
    assert table[0].startswith("| family | n | accuracy |") and len(table) == 2 + 3 + 1
    assert "| colour | 4 | 0.750 | – |" in table[2]
    assert table[-1].startswith("| **overall** | 8 | 0.625 |")
    # Descriptions alone: no short answers, so no overall accuracy row (it would read 0.000 over 0 questions).
    only = to_markdown(score([{"family": "description", "prediction": GOLD, "answer": GOLD}])).splitlines()
    assert len(only) == 3 and only[-1].startswith("| description |")


def test_descriptions_of_rendered_scenes_parse_back():
    from sparsecut.data.shapesworld import describe, sample_scene, scene_rng

    for i in range(30):
        scene = sample_scene(scene_rng(0, "metrics", i))
        parsed = parse_description(describe(scene))
        assert [(p.size, p.colour, p.pattern, p.shape, p.region) for p in parsed] == [
            (o.size, o.colour, o.pattern, o.shape, o.region) for o in scene.objects
        ]
        assert description_metrics([describe(scene)], [describe(scene)])["f1"] == 1.0
