"""--executor local: the embed stages in the driver's process, without Ray, for small inputs.

Its output must be the Ray pipeline's output: the same embeddings (equal to ST's), the same
error rows, the same resume and --retry-errors behaviour; `auto` picks it only where no cluster
is in play and the input would get a single preprocess actor.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sentence_transformers import SentenceTransformer

from tests.conftest import run_job
from tests.helpers import decoded, image_bytes, max_abs_diff, read_output

REPO = Path(__file__).resolve().parents[1]


def _corpus(tmp_path: Path) -> tuple[Path, dict]:
    media = tmp_path / "media"
    media.mkdir()
    images = {}
    for i in range(6):
        data = image_bytes(i, fmt="JPEG" if i % 2 else "PNG", size=(64 + 8 * i, 48))
        (media / f"img{i}.png").write_bytes(data)
        images[f"i{i}"] = data
    (media / "broken.png").write_bytes(b"not an image")
    texts = {"t0": "a photo of a cat", "t1": "a red bicycle", "t2": "mountains at dawn with fog"}
    rows = [{"id": k, "text": v, "image": None} for k, v in texts.items()]
    rows += [{"id": k, "text": None, "image": f"media/img{k[1:]}.png"} for k in images]
    rows += [
        {"id": "bad-image", "text": None, "image": "media/broken.png"},
        {"id": "missing", "text": None, "image": "media/nope.png"},
        {"id": "empty-text", "text": "  ", "image": None},
    ]
    src = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    return src, {"texts": texts, "images": images}


def test_local_run_equals_the_ray_run_and_st(ray_session, tiny_clip, tmp_path):
    src, corpus = _corpus(tmp_path)
    outs = {}
    for executor in ("local", "ray"):
        out = tmp_path / f"out-{executor}"
        assert run_job("pipelines.embed", ["--input", src, "--output", out, "--model", tiny_clip,
                                           "--batch-size", 4, "--executor", executor]) == 0
        outs[executor] = read_output(out)
    (emb_l, err_l, man_l), (emb_r, err_r, man_r) = outs["local"], outs["ray"]
    assert man_l["resources"]["executor"] == "local" and man_l["resources"]["ray"] == "local"
    assert man_r["resources"]["ray"] != "local"
    # Every id lands once, and in the same place on both executors.
    assert set(emb_l) == set(emb_r) == set(corpus["texts"]) | set(corpus["images"])
    def reasons(errors):  # object addresses in exception texts differ between processes
        return {k: (v["stage"], re.sub(r"0x[0-9a-f]+", "0x", v["error"])) for k, v in errors.items()}

    assert reasons(err_l) == reasons(err_r)
    assert set(err_l) == {"bad-image", "missing", "empty-text"}
    assert man_l["counts"]["written"] + man_l["counts"]["errors"] == man_l["counts"]["records"] == 12
    ids = sorted(emb_l)
    assert max_abs_diff(emb_l, ids, np.stack([emb_r[i] for i in ids])) <= 1e-5
    st = SentenceTransformer(tiny_clip, device="cpu")
    text_ids = sorted(corpus["texts"])
    image_ids = sorted(corpus["images"])
    assert max_abs_diff(emb_l, text_ids, st.encode([corpus["texts"][i] for i in text_ids])) <= 1e-5
    assert max_abs_diff(emb_l, image_ids, st.encode([decoded(corpus["images"][i]) for i in image_ids])) <= 1e-5


def test_local_retry_errors_resumes_around_committed_shards(tiny_clip, tmp_path, capsys):
    src, corpus = _corpus(tmp_path)
    out = tmp_path / "out"
    argv = ["--input", src, "--output", out, "--model", tiny_clip, "--executor", "local", "--shard-rows", 2]
    assert run_job("pipelines.embed", argv) == 0
    before = {p.name: p.read_bytes() for p in out.glob("part-*.parquet")}
    (tmp_path / "media" / "nope.png").write_bytes(image_bytes(42))  # the missing image arrives
    assert run_job("pipelines.embed", [*argv, "--retry-errors"]) == 0
    emb, errors, manifest = read_output(out)
    assert "missing" in emb and set(errors) == {"bad-image", "empty-text"}
    assert manifest["counts"]["retried_errors"] == 3 and manifest["counts"]["duplicate_ids"] == 0
    for name, data in before.items():  # committed embeddings are kept as they were
        assert (out / name).read_bytes() == data
    st = SentenceTransformer(tiny_clip, device="cpu")
    assert max_abs_diff(emb, ["missing"], st.encode([decoded(image_bytes(42))])) <= 1e-5


def test_auto_picks_local_only_without_a_cluster_and_for_small_inputs(tiny_clip, tmp_path, monkeypatch):
    from mmembed import cli
    from mmembed.errors import UsageError
    from mmembed.executors import cluster
    from mmembed.inputs.discover import InputSpec

    ray = pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def choice(n: int, modalities=("image",), *extra: str) -> str:
        cfg = cli.parse("embed", ["--input", "x", "--output", "y", "--model", tiny_clip, *extra])
        return cluster.choose_executor(cfg, InputSpec("x", "media", num_records=n, modalities=set(modalities)))

    assert choice(16) == "local"
    assert choice(2_000) == "local" and choice(2_001) == "ray"
    assert choice(20_000, ("text",)) == "local" and choice(20_001, ("text",)) == "ray"
    assert choice(16, ("image",), "--num-preprocessors", "2") == "ray"  # a pool was asked for
    assert choice(16, ("image",), "--address", "ray://head:10001") == "ray"
    assert choice(16, ("image",), "--executor", "ray") == "ray"
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # a Ray already up in this process
    assert choice(16) == "ray"
    assert choice(10**6, ("image",), "--executor", "local") == "local"
    with pytest.raises(UsageError, match="--executor local"):
        choice(16, ("image",), "--executor", "local", "--address", "ray://head:10001")


@pytest.mark.slow
def test_a_cold_small_job_runs_without_starting_ray(tiny_clip, tmp_path):
    media = tmp_path / "photos"
    media.mkdir()
    for i in range(16):
        (media / f"p{i:02d}.jpg").write_bytes(image_bytes(i, fmt="JPEG"))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "pipelines.embed", "--input", str(media), "--output", str(out),
                           "--model", tiny_clip], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["resources"]["executor"] == "local"
    assert manifest["counts"]["written"] == 16 and manifest["counts"]["errors"] == 0
