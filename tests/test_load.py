"""The loopback load test (benchmarks/load_test.py) at CI size: concurrent sessions complete and stay isolated.
Timings are reported by the script, never asserted here."""

from dataclasses import replace

import pytest

from benchmarks import load_test
from demo.engine import ChatEngine

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # pandas 3 deprecations in Gradio


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    engine = ChatEngine.load("tiny", max_new_tokens=12)
    return load_test.run_load_test(
        engine, sessions=4, turns=2, directory=tmp_path_factory.mktemp("load"), max_new_tokens=12, timeout=120
    )


def test_concurrent_sessions_all_complete(report):
    assert report["errors"] == []
    assert report["counts"]["sessions_completed"] == 4
    assert report["counts"]["chat_requests_completed"] == report["counts"]["visualize_requests_completed"] == 8
    assert report["latency"]["chat"]["n"] == 8


def test_each_session_sees_only_its_own_image_and_history(report):
    assert report["isolation"]["conversations_distinguishable"]  # a mix-up would show
    assert report["isolation"]["sessions_not_matching_their_own_conversation"] == []
    for session in report["per_session"]:
        tokens = [turn["input_tokens"] for turn in session["turns"]]
        assert all(a < b for a, b in zip(tokens, tokens[1:]))  # each follow-up carries the turns before it


def test_the_isolation_check_catches_swapped_sessions(report):
    turns = [[load_test.Observed(**turn) for turn in s["turns"]] for s in report["per_session"]]
    results = [load_test.SessionResult(turns=t) for t in turns]
    assert load_test.isolation(turns, results)["sessions_not_matching_their_own_conversation"] == []
    swapped = [results[1], results[0], *results[2:]]
    assert load_test.isolation(turns, swapped)["sessions_not_matching_their_own_conversation"] == [0, 1]
    mixed_history = [replace(results[0], turns=[turns[0][0], turns[1][1]]), *results[1:]]
    assert load_test.isolation(turns, mixed_history)["sessions_not_matching_their_own_conversation"] == [0]
