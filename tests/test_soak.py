"""A short run of the soak benchmark (benchmarks/soak.py) against `python app.py --model tiny`: the server's memory
and upload folder stay within the bounds, and every kind of request gets its truthful outcome."""

import pytest

from benchmarks.soak import BOUNDS, run_soak

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


def test_a_short_soak_stays_within_the_bounds(tmp_path):
    report = run_soak(requests=20, warm_up=10, scratch=tmp_path, file_max_age=2, every=10)  # each kind at least once
    assert report["server_alive_at_end"] and report["failures"] == []
    assert max(report["single_request_peak_mb"].values()) <= BOUNDS["single_request_peak_mb"]
    assert report["growth_after_warm_up_mb"] <= BOUNDS["growth_after_warm_up_mb"]
    files_at_start = report["checkpoints"][0]["files"]["other"]  # Gradio's copies of the example scenes
    assert report["after_sweep"]["files"] == {"previews": 0, "other": files_at_start}
    outcomes = report["outcomes"]
    assert outcomes["new 640x480"] == {"served": 12} and outcomes["abandoned"] == {"left": 2}
    assert outcomes["JPEG 6000x4000"] == {"served": 1} and outcomes["PNG 2800x2800"] == {"served": 2}
    for kind in ("thin 20000x10", "thin 100000x1", "huge PNG 9000x9000"):
        assert outcomes[kind] == {"refused": 1}
    replies = report["replies"]
    assert "times wider than tall" in replies["thin 100000x1: refused"]
    assert "at most 8.4 megapixels" in replies["huge PNG 9000x9000: refused"]
