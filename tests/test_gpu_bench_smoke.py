"""The GPU benchmark's --smoke mode on CPU: every measurement runs and the parity check holds."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_benchmark_smoke(ray_session, tmp_path, capsys):
    sys.path.insert(0, ROOT)  # benchmarks/ is not a package on the path; its pool workers import mmembed.testing
    from benchmarks import gpu

    out = tmp_path / "out"
    rc = gpu.main(
        [
            "--smoke",
            "--device", "cpu",
            "--out", str(out),
            "--workdir", str(tmp_path / "work"),
            "--workloads", "clip_b32_nvdecode,qwen3vl_mixed",
            "--cpus", "2",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0, printed
    report = json.loads((out / "results.json").read_text())
    assert report["env"]["card"].startswith("cpu")
    import importlib.util

    names = ["qwen3vl_mixed"]
    if importlib.util.find_spec("nvidia.nvimgcodec") is None:
        assert "not installed" in report["results"]["clip_b32_nvdecode"]["skipped"]
    else:
        names.append("clip_b32_nvdecode")  # --decode-on-device by nvImageCodec (its CPU backend here)
        decode = report["results"]["clip_b32_nvdecode"]["decode"]
        assert decode["img_s"] > 0 and set(decode["hw_share_sweep"]) == {"0.0", "0.5", "0.75", "1.0"}
    for name in names:
        r = report["results"][name]
        assert r["passed"], r
        for key in ("st", "forward", "pre"):
            assert r[key]["img_s"] > 0
        w = r["config"]
        assert r["pre"]["ok"] == w["n_pre"] and r["pre"]["errors"] == 0
        assert r["e2e"]["written"] == w["n_e2e"] and r["e2e"]["errors"] == 0
        # fp32 on CPU: the pipeline equals ST, not merely points the same way
        assert r["parity"]["min_cosine"] >= 0.99999
        assert r["parity"]["max_abs_diff"] <= 1e-5
        s = r["summary"]
        assert s["e2e_over_st"] == pytest.approx(s["e2e_img_s"] / r["st"]["img_s"])
        ceiling = min(r["forward"]["img_s"], r["pre"]["img_s"], r.get("decode", {}).get("img_s", float("inf")))
        assert s["e2e_over_ceiling"] == pytest.approx(s["e2e_img_s"] / ceiling)
        assert s["e2e_over_forward"] == pytest.approx(s["e2e_img_s"] / r["forward"]["img_s"])
    mixed = report["results"]["qwen3vl_mixed"]["padding"]
    assert 0.0 <= mixed["token_budget"] <= mixed["unsorted_chunks"]
    assert (out / "throughput.png").stat().st_size > 1000
    table = (out / "table.txt").read_text()
    assert "clip_b32_nvdecode" in table and "qwen3vl_mixed" in table and "e2e/ST" in table
    # A workload that no longer fits the budget is skipped and said so, not run short.
    rc = gpu.main(["--smoke", "--device", "cpu", "--out", str(out), "--workdir", str(tmp_path / "work"),
                   "--workloads", "clip_b32", "--cpus", "2", "--budget-s", "1"])
    capsys.readouterr()
    assert rc == 0
    skipped = json.loads((out / "results.json").read_text())["results"]["clip_b32"]
    assert skipped["skipped"].startswith("budget") and "e2e" not in skipped
