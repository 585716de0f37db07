"""benchmarks/host.py --smoke runs end to end on every workload: both routes, a ratio, a profile."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_host_benchmark_smoke(ray_session, tmp_path):
    sys.path.insert(0, str(ROOT))  # benchmarks/ is not a package on the path; its pool workers import mmembed
    from benchmarks import host

    out = tmp_path / "r.json"
    assert host.main(["--smoke", "--profile", "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["workloads"]) == {"clip_photos", "qwen_shots", "pdf_pages", "colqwen_shots"}
    for name, w in report["workloads"].items():
        assert w["bare"][w["baseline"]] > 0 and w["median_ratio"] > 0, name
        assert w["pairs"][0]["job"]["units"] == (32 if name == "pdf_pages" else 4)
        assert abs(sum(share for _, share in w["profile"]) - 1.0) < 0.5, w["profile"]
