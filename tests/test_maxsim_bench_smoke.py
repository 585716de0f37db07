"""benchmarks/maxsim_index.py --smoke: exact and approximate MaxSim measured on one small synthetic corpus."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("faiss")


def test_maxsim_benchmark_smoke(tmp_path):
    sys.path.insert(0, ROOT)
    from benchmarks import maxsim_index as bench

    out = tmp_path / "maxsim.json"
    assert bench.main(["--smoke", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["st_exact"]["qps"] > 0
    # mmembed's exact search is exact: ST's top 10 (up to the order of float sums at a tie: threads differ).
    assert report["mmembed_exact"]["recall@10"] >= 0.99
    assert {ix["kind"] for ix in report["indexes"]} == {"ivf-flat", "ivf-sq8"}
    for ix in report["indexes"]:
        assert ix["bytes_per_page"]["vectors"] == 64 * 64 * 4  # float32 token vectors, document-ordered
    assert {(p["kind"], p["nprobe"]) for p in report["points"]} == {(k, n) for k in ("ivf-flat", "ivf-sq8")
                                                                      for n in (4, 16)}
    for p in report["points"]:
        assert 0 < p["recall@10"] <= 1 and p["qps"] > 0
