"""benchmarks/feed.py --smoke: every measurement of the feed benchmark runs.

CLIP photos only: each smoke job is all fixed cost (actor start-up), and the Qwen3-VL workload
runs the same code with another model and corpus.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_feed_benchmark_smoke(ray_session, tmp_path, capsys):
    sys.path.insert(0, ROOT)
    from benchmarks import feed

    out = tmp_path / "feed.json"
    rc = feed.main(["--smoke", "--workloads", "clip_photos", "--workdir", str(tmp_path / "work"), "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"clip_photos"}
    for name, r in report["results"].items():
        assert r["P"] > 0
        # every job wrote every record (feed.py refuses a job with errors or missing rows)
        assert r["preprocess_only"]["big"]["n"] == 16
        assert sorted(r["by_factor"]) == ["0.5", "1.0", "2.0"]
        for factor, f in r["by_factor"].items():
            assert f["R"] == pytest.approx(float(factor) * r["P"])
            assert f["encoder_check"]["measured"] > 0
            assert f["end_to_end"]["big"]["n"] == 16
            assert f["efficiency"] == pytest.approx(f["E"] / min(r["P"], f["R"]))
        assert name in printed
    assert "E/min(P,R)" in printed
