"""ShapesWorld questions as people ask them (sparsecut/data/shapesworld/phrasing.py) and the scoring of answers
in a form."""

import re
from collections import Counter, defaultdict

import pytest

from sparsecut.data.llava_format import load_llava_json
from sparsecut.data.shapesworld import (
    COLOURS,
    FAMILIES,
    PATTERNS,
    REGIONS,
    SHAPES,
    SIZES,
    answer,
    describe,
    generate_dataset,
    make_questions,
    sample_scene,
    scene_rng,
)
from sparsecut.data.shapesworld.phrasing import (
    FRAMES,
    INSTRUCTIONS,
    NOUNS,
    OUTSIDE_THINGS,
    PICTURES,
    PREFIXES,
    rephrase,
)
from sparsecut.evaluation.metrics import description_metrics, score, states_answer

VALUES = sorted(
    {*COLOURS, *SHAPES, *SIZES, *PATTERNS, *REGIONS, "crosses", *[w + "s" for w in SHAPES]}, key=len, reverse=True
)


def phrased(pool: str, n_scenes: int = 400):
    """(family, question spec, phrased) for `n_scenes` scenes, families balanced as in the datasets."""
    asked, out = Counter(), []
    for i in range(n_scenes):
        rng = scene_rng(5, f"phrasing-{pool}", i)
        scene = sample_scene(rng)
        for q in make_questions(scene, 4, rng, asked):
            out.append((scene, q, rephrase(scene, q, rng, pool)))
    return out


@pytest.fixture(scope="module")
def train_pool():
    return phrased("train")


@pytest.fixture(scope="module")
def heldout_pool():
    return phrased("heldout")


def skeleton(text: str) -> str:
    """The question with its object words masked, so that only the phrasing is left."""
    text = text.lower()
    for value in VALUES:
        text = re.sub(rf"\b{value}\b", "_", text)
    text = re.sub(r"\b[a-z0-9]\b(?= printed|$)", "_", text)
    return re.sub(r"(_ ?)+", "_ ", text)


@pytest.mark.parametrize("pool", ["train", "heldout"])
def test_every_family_is_asked_in_at_least_30_phrasings(pool, train_pool, heldout_pool):
    by_family = defaultdict(set)
    for _, q, p in train_pool if pool == "train" else heldout_pool:
        by_family[q.family].add(skeleton(p.text))
    assert set(by_family) == set(FAMILIES)
    assert all(len(phrasings) >= 30 for phrasings in by_family.values()), {f: len(s) for f, s in by_family.items()}


def test_held_out_frames_and_words_never_occur_in_training(train_pool):
    texts = " ".join(p.text.lower() for _, _, p in train_pool)
    for word in (*NOUNS["heldout"], *PICTURES["heldout"], *OUTSIDE_THINGS["heldout"]):
        assert not re.search(rf"\b{word}s?\b", texts), word
    for family, pools in FRAMES.items():
        assert not set(pools["train"]) & set(pools["heldout"]), family
    for form, instructions in INSTRUCTIONS["heldout"].items():
        assert not set(instructions) & set(INSTRUCTIONS["train"][form]), form
        assert not any(i.lower() in texts for i in instructions), instructions
    assert not set(PREFIXES["heldout"]) - {""} & set(PREFIXES["train"])


def test_the_word_shape_occurs_in_every_family(train_pool):
    # No single word may decide the type of the answer: "shape" in a question does not mean "name a shape".
    families = {q.family for _, q, p in train_pool if re.search(r"\bshapes?\b", p.text.lower())}
    assert families == set(FAMILIES)


def test_short_answers_are_the_scene_graphs_and_other_forms_state_them(train_pool, heldout_pool):
    forms = Counter()
    for scene, q, p in train_pool + heldout_pool:
        forms[p.form] += 1
        if q.family == "description":
            assert p.short == describe(scene)
            assert description_metrics([p.answer], [describe(scene)])["f1"] == 1.0  # prose and lists parse alike
        elif p.question is not None:
            assert p.short == answer(scene, p.question), (p.text, p.short)
        else:  # a thing that is never in a scene
            assert p.short in ("no", "0"), p.text
        assert states_answer(p.answer, p.short, p.form), (p.text, p.answer, p.form)
    assert all(forms[form] > 20 for form in ("short", "sentence", "reason", "prose")), forms


def test_asked_form_follows_the_instruction(train_pool):
    for _, _, p in train_pool:
        if p.form == "sentence":
            assert any(i in p.text for i in INSTRUCTIONS["train"]["sentence"]), p.text
        if p.form == "reason":
            assert any(i in p.text for i in INSTRUCTIONS["train"]["reason"]), p.text
        if p.form == "short" and p.short in ("yes", "no") and "Answer with a number." in p.text:
            pytest.fail(f"a yes/no question asks for a number: {p.text}")


def test_questions_about_things_outside_the_world_are_answered_no(train_pool):
    outside = [p for _, _, p in train_pool if any(f" {t}" in p.text for t in OUTSIDE_THINGS["train"])]
    assert outside and all(p.short in ("no", "0") for p in outside)


@pytest.mark.parametrize(
    "prediction,short,form,right",
    [
        ("The large shape is red.", "red", "sentence", True),
        ("red", "red", "sentence", False),  # asked for a sentence, got a word
        ("The large shape is blue.", "red", "sentence", False),
        ("The red shape is at the top left.", "top left", "sentence", True),
        ("Yes, the circle is to the left of the star.", "yes", "sentence", True),
        ("No, the circle is not to the left of the star.", "yes", "sentence", False),
        ("There are no red shapes.", "0", "sentence", True),
        ("There are 3 red shapes: a ...", "3", "reason", True),
        ("There are 3 red shapes.", "3", "reason", False),  # no reason given
        ("Three.", "3", "short", True),
        ("The picture shows 2 shapes. There is a small red solid circle at the top.", "", "prose", True),
        ("a small red solid circle at the top", "", "prose", False),
    ],
)
def test_states_answer(prediction, short, form, right):
    assert states_answer(prediction, short, form) is right


def test_scores_keep_forms_apart_from_short_answers(tmp_path):
    path = generate_dataset(tmp_path, n_images=30, split="val", phrasing="train")
    samples = load_llava_json(path, image_root=str(tmp_path))
    assert all({"form", "short"} <= set(s.meta) for s in samples)
    records = [
        {
            "family": s.meta["family"],
            "form": s.meta["form"],
            "short": s.meta["short"],
            "prediction": s.turns[1][1],
            "answer": s.turns[1][1],
        }
        for s in samples
    ]
    scores = score(records)
    assert scores["overall"]["accuracy"] == 1.0
    assert all(m["accuracy"] == 1.0 for m in scores["forms"].values())
    assert sum(m["n"] for m in scores["forms"].values()) == sum(s.meta["form"] != "short" for s in samples)
    with pytest.raises(ValueError, match="phrasing"):
        generate_dataset(tmp_path, n_images=1, phrasing="casual")
