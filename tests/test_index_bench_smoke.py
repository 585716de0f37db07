"""benchmarks/index.py --smoke: every measurement of the index benchmark runs, and the exact points are exact."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("faiss")


def test_index_benchmark_smoke(tmp_path, capsys):
    sys.path.insert(0, ROOT)
    from benchmarks import index as bench

    out = tmp_path / "index.json"
    assert bench.main(["--smoke", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"iid", "clustered"}
    for name, r in report["results"].items():
        assert r["exact_qps"] > 0 and r["n"] == 3000 and r["queries"] == 40
        kinds = {p["kind"] for p in r["points"]}
        assert kinds == {"flat", "ivf-flat", "ivf-sq8", "hnsw"}
        for p in r["points"]:
            assert 0 <= p["recall"] <= 1 and p["qps"] > 0 and p["build_s"] >= 0
            assert p["ratio"] == pytest.approx(p["qps"] / r["exact_qps"], rel=0.01, abs=0.01)
            assert p["meets"] == (p["recall"] >= 0.95 and p["ratio"] >= 20)
        # A flat index, and IVF probing every list, return the exact top-10.
        flat = [p for p in r["points"] if p["kind"] == "flat"]
        full = [p for p in r["points"] if p["kind"] == "ivf-flat" and p["value"] == p["build"]["nlist"]]
        assert [p["recall"] for p in flat + full] == [1.0, 1.0], name
        nprobes = [p["value"] for p in r["points"] if p["kind"] == "ivf-flat"]
        assert nprobes == sorted(nprobes) and len(nprobes) >= 3
        assert f"[{name}] N=3,000" in printed
    assert "target: recall@10 >= 0.95 at >= 20x" in printed
