"""benchmarks/cold.py runs end to end: both sides of both jobs succeed and a ratio comes out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_cold_benchmark_smoke(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks import cold

    assert cold.main(["--pairs", "1", "--workdir", str(tmp_path / "work"), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["sizes"] == {"pairs": 100, "records": 30}
    for job in ("rerank", "reembed"):
        assert report["jobs"][job]["median_ratio"] > 0
