"""Tests of ShapesWorld: determinism, scene invariants, answers re-derived from scene graphs, rendering,
legibility of fine detail, and dataset export."""

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from sparsecut.data.llava_format import load_llava_json
from sparsecut.data.shapesworld import (
    CHAR_SHAPES,
    CHARS,
    COLOUR_RGB,
    COLOURS,
    FAMILIES,
    LABEL_CLASSES,
    PATTERNS,
    REGIONS,
    SHAPES,
    SIZE_RADIUS,
    SIZES,
    Background,
    Scene,
    SceneObject,
    answer,
    describe,
    downsample,
    generate_dataset,
    glyph_bitmap,
    glyph_cut_by_grid,
    legibility_report,
    load_scenes,
    make_question,
    make_questions,
    render,
    render_array,
    render_layers,
    sample_scene,
    scene_from_dict,
    scene_labels,
    scene_rng,
    scene_to_dict,
)
from sparsecut.evaluation.metrics import parse_description

N_SCENES = 150  # enough to hit every family and phrasing many times, small enough to stay fast


def scenes(split: str = "t", n: int = N_SCENES) -> list[Scene]:
    return [sample_scene(scene_rng(0, split, i)) for i in range(n)]


def grid(obj: SceneObject) -> tuple[int, int]:
    return divmod(REGIONS.index(obj.region), 3)


# ---- determinism -------------------------------------------------------------------------------------


def test_same_seed_gives_identical_scene_and_image_bytes():
    a, b = (sample_scene(scene_rng(7, "train", 3)) for _ in range(2))
    assert a == b
    assert render(a).tobytes() == render(b).tobytes()


def test_different_seed_index_or_split_gives_different_scenes():
    base = sample_scene(scene_rng(7, "train", 3))
    for other in (scene_rng(8, "train", 3), scene_rng(7, "train", 4), scene_rng(7, "test", 3)):
        scene = sample_scene(other)
        assert scene != base
        assert render(scene).tobytes() != render(base).tobytes()


def test_scene_survives_a_json_round_trip():
    for scene in scenes(n=20):
        assert scene_from_dict(json.loads(json.dumps(scene_to_dict(scene)))) == scene


# ---- scene invariants --------------------------------------------------------------------------------


def test_scene_invariants():
    counts = Counter()
    for scene in scenes():
        assert 1 <= len(scene.objects) <= 8
        regions = [REGIONS.index(o.region) for o in scene.objects]
        assert regions == sorted(set(regions)), "one object per region, in reading order"
        for o in scene.objects:
            assert o.shape in SHAPES and o.colour in COLOURS and o.size in SIZES and o.pattern in PATTERNS
            assert o.char is None or (o.char in CHARS and o.size == "large" and o.shape in CHAR_SHAPES)
            # The object's extent stays inside its grid cell, so objects never overlap.
            row, col = grid(o)
            r = SIZE_RADIUS[o.size]
            assert col / 3 < o.x - r and o.x + r < (col + 1) / 3
            assert row / 3 < o.y - r and o.y + r < (row + 1) / 3
            counts[o.char is not None] += 1
        counts[scene.background.kind] += 1
    assert counts[True] > 0 and counts["plain"] and counts["gradient"] and counts["noise"]


def test_object_colours_are_distinct_from_each_other_and_from_backgrounds():
    rgb = np.array([COLOUR_RGB[c] for c in COLOURS], float)
    pairwise = np.abs(rgb[:, None] - rgb[None]).max(-1) + np.eye(len(rgb)) * 999
    assert pairwise.min() >= 60
    backgrounds = np.array([c for s in scenes() for c in (s.background.colour, s.background.colour2)], float)
    assert np.abs(backgrounds[:, None] - rgb[None]).max(-1).min() >= 60


def test_glyphs_are_distinct_5x7_bitmaps():
    bitmaps = np.stack([glyph_bitmap(c).ravel() for c in CHARS])
    assert bitmaps.shape == (36, 35)
    differences = (bitmaps[:, None] != bitmaps[None]).sum(-1) + np.eye(36, dtype=int) * 99
    assert differences.min() >= 2


def test_scene_labels_decode_back_to_the_objects():
    for scene in scenes(n=30):
        labels = scene_labels(scene)
        assert set(labels) == set(LABEL_CLASSES)
        for values in labels.values():
            assert values.shape == (9,) and values.dtype == np.int64
        by_region = {o.region: o for o in scene.objects}
        for r, region in enumerate(REGIONS):
            decoded = {key: LABEL_CLASSES[key][labels[key][r]] for key in labels}
            if region not in by_region:
                assert set(decoded.values()) == {"empty"}
                continue
            o = by_region[region]
            assert (decoded["shape"], decoded["colour"], decoded["size"], decoded["pattern"]) == (
                o.shape,
                o.colour,
                o.size,
                o.pattern,
            )
            assert decoded["char"] == (o.char or "none")


# ---- questions and answers ---------------------------------------------------------------------------


def matching(scene: Scene, ref) -> list[SceneObject]:
    """The objects a referring expression denotes, computed independently of the library's Ref.matches."""
    named = {k: v for k, v in vars(ref).items() if v is not None}
    return [o for o in scene.objects if all(getattr(o, k) == v for k, v in named.items())]


def oracle(scene: Scene, q) -> str:
    """Each family's answer, derived here from the scene graph alone."""
    if q.family == "description":
        return "; ".join(f"{o.size}|{o.colour}|{o.pattern}|{o.shape}|{o.char}|{o.region}" for o in scene.objects)
    found = matching(scene, q.ref)
    if q.family == "count":
        return str(len(found))
    if q.family == "existence":
        return "yes" if found else "no"
    assert len(found) == 1, f"ambiguous or empty reference in {q.text!r}"
    (obj,) = found
    if q.family == "relation":
        (other,) = matching(scene, q.ref2)
        (row, col), (row2, col2) = grid(obj), grid(other)
        facts = {"left": col < col2, "right": col > col2, "above": row < row2, "below": row > row2}
        if q.relation in facts:
            return "yes" if facts[q.relation] else "no"
        first, second = q.relation.split("/")
        assert facts[first] != facts[second], "a which-question needs objects on different lines"
        return first if facts[first] else second
    return {
        "colour": obj.colour,
        "shape": obj.shape,
        "position": obj.region,
        "pattern": obj.pattern,
        "character": obj.char,
    }[q.family]


def as_oracle_string(family: str, text: str) -> str:
    """A library answer in the oracle's format (descriptions are parsed back into attribute lists)."""
    if family != "description":
        return text
    parts = []
    for o in parse_description(text):
        char = o.char.upper() if o.char else None
        parts.append(f"{o.size}|{o.colour}|{o.pattern}|{o.shape}|{char}|{o.region}")
    return "; ".join(parts)


def all_questions() -> list[tuple[Scene, object]]:
    out, asked = [], Counter()
    for i, scene in enumerate(scenes()):
        rng = scene_rng(0, "questions", i)
        out += [(scene, q) for q in make_questions(scene, 4, rng, asked)]
    return out


@pytest.fixture(scope="module")
def questions():
    return all_questions()


def test_every_answer_is_rederived_from_the_scene_graph(questions):
    for scene, q in questions:
        assert as_oracle_string(q.family, answer(scene, q)) == oracle(scene, q), q.text


def test_question_text_names_every_attribute_of_its_references(questions):
    for _, q in questions:
        for ref in (q.ref, q.ref2):
            for value in (v for v in vars(ref).values() if v is not None) if ref else ():
                assert value in q.text, (value, q.text)


def test_references_never_give_the_answer_away(questions):
    for _, q in questions:
        if q.family in ("position", "relation"):
            assert q.ref.region is None and (q.ref2 is None or q.ref2.region is None), q.text
        if q.family in ("colour", "shape"):
            assert getattr(q.ref, q.family) is None, q.text


def test_which_side_questions_offer_both_sides_and_end_on_an_object_or_a_side(questions):
    texts = [(q.text, q.relation) for _, q in questions if q.family == "relation" and "/" in q.relation]
    assert {t.split()[0] for t, _ in texts} >= {"Is", "Relative", "Compared"}
    for text, relation in texts:
        first, second = relation.split("/")
        assert first in text and second in text, text
        # "Relative to the star, is the circle to the left or to the right of?" once left a preposition dangling.
        assert not text.endswith(" of?"), text


def test_all_families_and_several_phrasings_appear_in_balance(questions):
    families = Counter(q.family for _, q in questions)
    assert set(families) == set(FAMILIES)
    assert max(families.values()) - min(families.values()) <= 0.25 * max(families.values())
    for family in FAMILIES:
        # Phrasings differ in their wording around the references, so compare the first two words.
        openings = {" ".join(q.text.split()[:2]) for _, q in questions if q.family == family}
        assert len(openings) >= 3, (family, openings)


def test_short_answers_are_single_words_numbers_or_region_names(questions):
    for scene, q in questions:
        a = answer(scene, q)
        if q.family != "description":
            assert a.isdigit() or a in REGIONS or a in CHARS or len(a.split()) == 1, (q.text, a)


def test_existence_negatives_are_balanced_and_plausible():
    answers = Counter()
    for i, scene in enumerate(scenes(n=400)):
        q = make_question(scene, "existence", scene_rng(1, "existence", i))
        a = answer(scene, q)
        answers[a] += 1
        if a == "no":
            # POPE-style adversarial negatives: a near miss, one attribute away from an object that is there.
            named = [k for k, v in vars(q.ref).items() if v is not None]
            assert any(sum(getattr(o, k) != getattr(q.ref, k) for k in named) == 1 for o in scene.objects)
    assert 0.4 < answers["yes"] / sum(answers.values()) < 0.6


def test_relation_yes_no_answers_are_balanced(questions):
    answers = Counter(answer(s, q) for s, q in questions if q.family == "relation" and "/" not in q.relation)
    assert 0.35 < answers["yes"] / (answers["yes"] + answers["no"]) < 0.65


def test_character_questions_need_a_character():
    scene = Scene(
        objects=(SceneObject("circle", "red", "small", "solid", "center", None, 0.5, 0.5),),
        background=Background("plain", (200, 200, 200), (200, 200, 200)),
    )
    assert make_question(scene, "character", scene_rng(0, "x", 0)) is None
    assert make_question(scene, "relation", scene_rng(0, "x", 0)) is None


def test_description_lists_every_object_in_reading_order():
    for scene in scenes(n=40):
        parsed = parse_description(describe(scene))
        assert [(p.shape, p.region, p.char) for p in parsed] == [
            (o.shape, o.region, o.char.lower() if o.char else None) for o in scene.objects
        ]


# ---- rendering and legibility ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [96, 128, 256])
def test_render_size_and_object_colours(size):
    scene = sample_scene(scene_rng(0, "render", size))
    coarse, _ = render_layers(scene, size)
    assert render(scene, size).size == (size, size)
    for o in scene.objects:
        # The coarse layer shows the object's flat colour at its centre, or beside the label if it has one.
        x = o.x - (0.7 * SIZE_RADIUS[o.size] if o.char else 0)
        assert np.abs(coarse[int(o.y * size), int(x * size)] - COLOUR_RGB[o.colour]).max() < 1


def test_odd_image_sizes_are_refused():
    with pytest.raises(ValueError, match="even"):
        render(sample_scene(scene_rng(0, "x", 0)), 127)


@pytest.mark.parametrize("size", [96, 128])
@pytest.mark.parametrize("shape", CHAR_SHAPES)
def test_character_label_stays_inside_the_outline(size, shape):
    slack = 1 / 6 - SIZE_RADIUS["large"] - 0.015
    for dx in (-slack, 0.0, slack):
        for dy in (-slack, slack):
            obj = SceneObject(shape, "red", "large", "striped", "center", "W", 0.5 + dx, 0.5 + dy)
            scene = Scene(objects=(obj,), background=Background("plain", (200, 200, 200), (200, 200, 200)))
            plain_obj = dataclasses.replace(obj, char=None, pattern="solid")
            plain = dataclasses.replace(scene, objects=(plain_obj,))
            inside = np.all(render_layers(plain, size)[0] == np.float32(COLOUR_RGB["red"]), axis=-1)
            label = np.all(render_layers(scene, size)[0] == np.float32(127.5), axis=-1)
            assert label.sum() == 12 * 16 and inside[label].all()


def test_fine_detail_is_absent_from_the_half_resolution_view():
    for scene in scenes(n=6):
        with_detail = np.asarray(render(scene), float)
        without = render_array(scene, fine_detail=False).astype(float)
        half_with = np.asarray(downsample(render(scene)), float)
        half_without = np.asarray(downsample(Image.fromarray(render_array(scene, fine_detail=False))), float)
        has_detail = any(o.pattern != "solid" or o.char for o in scene.objects)
        assert (np.abs(with_detail - without).max() > 30) == has_detail
        assert np.abs(half_with - half_without).max() <= 5  # rare clipping at 0 or 255 leaks a little
        assert np.sqrt(((half_with - half_without) ** 2).mean()) < 0.5


def test_legibility_report_shows_fine_detail_legible_only_at_full_resolution():
    report = legibility_report(image_size=128, seed=0, n_scenes=30)
    assert report["glyphs"] >= 8 and report["objects"] >= 100
    assert report["pattern_accuracy_full"] > 0.9 and report["glyph_accuracy_full"] > 0.9
    assert report["pattern_accuracy_half"] < 0.45 and report["glyph_accuracy_half"] < 0.25
    assert report["retained_bicubic"] < 0.05
    # The measurement can see legible detail at half resolution: nearest-neighbour downsampling picks one
    # pixel in four and so keeps the glyphs' strokes.
    assert report["retained_nearest"] > 0.5
    nearest = legibility_report(image_size=128, seed=0, n_scenes=30, half_filter="nearest")
    assert nearest["glyph_accuracy_half"] > 0.8


def test_the_crop_borders_of_a_2x2_grid_cut_the_glyphs_of_the_middle_row_and_column():
    for region in range(9):
        row, col = divmod(region, 3)
        obj = SceneObject("circle", "red", "large", "solid", "center", "K", (col + 0.5) / 3, (row + 0.5) / 3)
        assert glyph_cut_by_grid(obj, 128, 2) == (row == 1 or col == 1)
        assert not glyph_cut_by_grid(obj, 128, 3)  # the borders of a 3x3 grid run between the cells' middles
        assert not glyph_cut_by_grid(dataclasses.replace(obj, char=None), 128, 2)


def test_legibility_report_reads_the_part_of_a_cut_glyph_that_one_crop_shows():
    two = legibility_report(image_size=128, seed=0, n_scenes=30)
    three = legibility_report(image_size=128, seed=0, n_scenes=30, high_res_grid=3)
    assert 0.3 < two["glyphs_cut"] < 0.8  # 5 of the 9 cells are in the middle row or column
    assert two["glyph_accuracy_crop"] > 0.8
    assert three["glyphs_cut"] == 0 and three["glyph_accuracy_crop"] == three["glyph_accuracy_full"]


# ---- dataset export ----------------------------------------------------------------------------------


def test_generated_dataset_is_consistent_deterministic_and_splits_are_disjoint(tmp_path):
    paths = {
        split: generate_dataset(tmp_path / "a", 8, seed=0, image_size=96, split=split) for split in ("train", "test")
    }
    again = generate_dataset(tmp_path / "b", 8, seed=0, image_size=96, split="train")
    assert again.read_bytes() == paths["train"].read_bytes()
    image = "images/train_000003.png"
    assert (tmp_path / "b" / image).read_bytes() == (tmp_path / "a" / image).read_bytes()

    scene_sets, image_sets = {}, {}
    for split, path in paths.items():
        samples = load_llava_json(path)
        assert len(samples) == 8 * 4
        scene_graphs = load_scenes(tmp_path / "a" / f"{split}_scenes.json")
        for s in samples:
            assert s.image.startswith(f"images/{split}_") and (tmp_path / "a" / s.image).exists()
            assert s.meta["family"] in FAMILIES and s.turns[0][1].startswith("<image>\n")
            question, reply = s.turns[0][1].removeprefix("<image>\n"), s.turns[1][1]
            if s.meta["family"] == "description":
                assert reply == describe(scene_graphs[s.image])
            elif s.meta["family"] == "count":
                assert 0 <= int(reply) <= len(scene_graphs[s.image].objects)
            assert question.endswith(("?", "."))
        scene_sets[split] = {json.dumps(scene_to_dict(v), sort_keys=True) for v in scene_graphs.values()}
        image_sets[split] = {(tmp_path / "a" / s.image).read_bytes() for s in samples}
        with Image.open(tmp_path / "a" / samples[0].image) as im:
            assert im.size == (96, 96) and im.mode == "RGB"
    assert not scene_sets["train"] & scene_sets["test"]
    assert not image_sets["train"] & image_sets["test"]


def test_the_command_line_writes_the_training_recipes_split_given_its_questions_per_image(tmp_path):
    from sparsecut.cli import main

    main(["shapesworld", str(tmp_path / "cli"), "--n-images", "3", "--image-size", "64", "--questions-per-image", "8"])
    generate_dataset(tmp_path / "api", n_images=3, seed=0, image_size=64, questions_per_image=8, split="train")
    written = json.loads((tmp_path / "cli" / "train.json").read_text())
    assert len(written) == 3 * 8
    assert written == json.loads((tmp_path / "api" / "train.json").read_text())
