"""Tests of the LLaVA conversation JSON reader/writer on a tiny fixture in the format of the real files."""

import json
import logging
from pathlib import Path

import pytest

from sparsecut.data.llava_format import Sample, group_by_image, load_llava_json, sample_to_messages, save_llava_json

FIXTURE = Path(__file__).parent / "fixtures" / "llava_tiny.json"


def test_loads_every_kind_of_record():
    pretrain, multi_turn, text_only, image_last = load_llava_json(FIXTURE)
    assert pretrain == Sample(
        id="004539375",
        image="00453/004539375.jpg",
        turns=[
            ("user", "<image>\nRender a clear and concise summary of the photo."),
            ("assistant", "select luxury furniture 3 - inch gel memory foam mattress topper"),
        ],
    )
    assert multi_turn.image == "coco/train2017/000000033471.jpg"
    assert [role for role, _ in multi_turn.turns] == ["user", "assistant"] * 3
    assert text_only.image is None and text_only.meta == {"model": ""}
    assert image_last.id == 1234 and image_last.turns[0][1].endswith("\n<image>")


def test_image_root_is_joined_on_load_and_removed_on_save(tmp_path):
    samples = load_llava_json(FIXTURE, image_root="/data/llava")
    assert samples[0].image == "/data/llava/00453/004539375.jpg" and samples[2].image is None
    save_llava_json(samples, tmp_path / "out.json", image_root="/data/llava")
    assert json.loads((tmp_path / "out.json").read_text()) == json.loads(FIXTURE.read_text())


def test_save_then_load_round_trips(tmp_path):
    samples = load_llava_json(FIXTURE)
    save_llava_json(samples, tmp_path / "out.json")
    assert load_llava_json(tmp_path / "out.json") == samples
    # The file itself comes back too: unknown keys such as "model" are kept, ids keep their type.
    assert json.loads((tmp_path / "out.json").read_text()) == json.loads(FIXTURE.read_text())


def test_placeholder_becomes_an_image_item_where_it_stood():
    pretrain, multi_turn, text_only, image_last = load_llava_json(FIXTURE)
    assert sample_to_messages(pretrain) == [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "Render a clear and concise summary of the photo."},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": pretrain.turns[1][1]}]},
    ]
    assert sample_to_messages(image_last)[0]["content"] == [
        {"type": "text", "text": "What brand name is on the sign?\nReference OCR token: Coca-Cola"},
        {"type": "image"},
    ]
    messages = sample_to_messages(multi_turn)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    assert sum(item["type"] == "image" for m in messages for item in m["content"]) == 1
    assert messages[2] == {"role": "user", "content": [{"type": "text", "text": multi_turn.turns[2][1]}]}
    assert all(item["type"] == "text" for m in sample_to_messages(text_only) for item in m["content"])


def _turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


def _record(**changes):
    record = {
        "id": "r1",
        "image": "a.jpg",
        "conversations": _turns(("human", "<image>\nWhat is it?"), ("gpt", "A cat.")),
    }
    record.update(changes)
    return {k: v for k, v in record.items() if v is not None}


@pytest.mark.parametrize(
    "record, problem",
    [
        (_record(conversations=[]), "conversations"),
        ({"id": "r1", "image": "a.jpg"}, "conversations"),
        (_record(conversations=_turns(("gpt", "<image>\nHi"), ("human", "Hello"))), "should be from 'human'"),
        (_record(conversations=_turns(("human", "<image>\nHi"), ("human", "Hello"))), "should be from 'gpt'"),
        (_record(conversations=_turns(("human", "<image>\nHi"), ("gpt", "Hello"), ("human", "More?"))), "pairs"),
        (_record(conversations=_turns(("human", "<image>\nHi"), ("gpt", "  "))), "empty"),
        (_record(conversations=_turns(("human", "What is it?"), ("gpt", "A cat."))), "0 <image> placeholder(s) for 1"),
        (_record(image=None), "1 <image> placeholder(s) for 0"),
        (_record(conversations=_turns(("human", "<image>\n<image>\nHi"), ("gpt", "Hello"))), "2 <image>"),
        (
            _record(conversations=_turns(("human", "Hi"), ("gpt", "Hello"), ("human", "<image>\nAnd?"), ("gpt", "No"))),
            "first human turn",
        ),
        (_record(image=["a.jpg", "b.jpg"]), "'image' must be"),
    ],
)
def test_malformed_records_raise_naming_the_record_and_the_problem(tmp_path, record, problem):
    good = _record(id="fine")
    (tmp_path / "bad.json").write_text(json.dumps([good, record]))
    with pytest.raises(ValueError, match="record 'r1'") as error:
        load_llava_json(tmp_path / "bad.json")
    assert problem in str(error.value)


def test_non_strict_loading_skips_malformed_records_and_says_so(tmp_path, caplog):
    (tmp_path / "mixed.json").write_text(json.dumps([_record(id="ok"), _record(conversations=[])]))
    with caplog.at_level(logging.WARNING):
        samples = load_llava_json(tmp_path / "mixed.json", strict=False)
    assert [s.id for s in samples] == ["ok"]
    assert "skipped 1 malformed record" in caplog.text


def test_a_file_that_is_not_a_list_is_refused(tmp_path):
    (tmp_path / "obj.json").write_text(json.dumps(_record()))
    with pytest.raises(ValueError, match="JSON list"):
        load_llava_json(tmp_path / "obj.json")


def _question(i: int, image: str | None) -> Sample:
    prompt = f"<image>\nQuestion {i}?" if image else f"Question {i}?"
    return Sample(id=f"q{i}", image=image, turns=[("user", prompt), ("assistant", f"Answer {i}.")], meta={"n": i})


def test_group_by_image_merges_records_of_one_image_into_multi_turn_conversations(tmp_path):
    samples = [
        _question(0, "a.png"),
        _question(1, "b.png"),
        _question(2, "a.png"),
        _question(3, None),
        _question(4, "a.png"),
        _question(5, "b.png"),
    ]
    merged = group_by_image(samples, max_turns=2)
    assert [(s.image, s.id) for s in merged] == [("a.png", "q0+q2"), ("a.png", "q4"), ("b.png", "q1+q5"), (None, "q3")]
    first = merged[0]
    assert first.turns == [
        ("user", "<image>\nQuestion 0?"),
        ("assistant", "Answer 0."),
        ("user", "Question 2?"),
        ("assistant", "Answer 2."),
    ]
    assert first.meta == {"n": 0}
    # Merged records are valid LLaVA records: one placeholder, in the first turn.
    save_llava_json(merged, tmp_path / "merged.json")
    assert load_llava_json(tmp_path / "merged.json") == merged
    assert group_by_image(samples, max_turns=1) == samples
