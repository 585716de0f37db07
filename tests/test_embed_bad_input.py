"""Bad input never kills a job and is never silently dropped; bad configurations fail before Ray."""

from __future__ import annotations

import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_job
from tests.helpers import image_bytes, read_output


def test_bad_records_become_error_rows(ray_session, tiny_clip, tmp_path):
    good = image_bytes(1)
    big = image_bytes(2, size=(400, 300))  # 120k pixels, over the limit set below
    ids = ["ok-text", "ok-img", "corrupt", "missing", "empty-text", "null-record", "bomb", "zero-bytes", "combo"]
    table = pa.table(
        {
            "id": ids,
            "text": ["fine", None, None, None, "   ", None, None, None, "text and image together"],
            "image": pa.array(
                [None, good, b"\x89PNG not really an image", None, None, None, big, b"", good], pa.binary()
            ),
        }
    )
    mdir = tmp_path / "m"
    mdir.mkdir()
    pq.write_table(table, mdir / "a.parquet")
    out = tmp_path / "out"
    rc = run_job(
        "pipelines.embed",
        # error-row: the image+text record is embedded-or-reported, not a reason to refuse the job.
        ["--input", mdir, "--output", out, "--model", tiny_clip, "--max-image-pixels", 100_000,
         "--on-unsupported", "error-row"],
    )
    assert rc == 0
    emb, errors, manifest = read_output(out)
    all_ids = set(ids)
    assert set(emb) | set(errors) == all_ids and not set(emb) & set(errors)
    assert set(emb) == {"ok-text", "ok-img"}
    reasons = {k: v["error"] for k, v in errors.items()}
    assert "undecodable image" in reasons["corrupt"]
    assert "empty record" in reasons["missing"]  # null cells everywhere
    assert "empty text" in reasons["empty-text"]
    assert "empty record" in reasons["null-record"]
    assert "pixel limit" in reasons["bomb"]
    assert "zero-byte" in reasons["zero-bytes"]
    assert "does not support image+text" in reasons["combo"]
    assert all(v["stage"] == "preprocess" for v in errors.values())
    assert manifest["counts"]["records"] == len(all_ids)
    assert manifest["counts"]["written"] + manifest["counts"]["errors"] == len(all_ids)


def test_missing_media_uri_is_an_error_row(ray_session, tiny_clip, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.png").write_bytes(image_bytes(3))
    pq.write_table(
        pa.table({"id": ["here", "gone"], "image": [str(media / "a.png"), str(media / "gone.png")]}),
        tmp_path / "m.parquet",
    )
    out = tmp_path / "out"
    assert run_job("pipelines.embed", ["--input", tmp_path / "m.parquet", "--output", out, "--model", tiny_clip]) == 0
    emb, errors, _ = read_output(out)
    assert set(emb) == {"here"}
    assert errors["gone"]["error"].startswith("not found:") and "gone.png" in errors["gone"]["error"]


def test_max_error_fraction_exits_nonzero_but_writes(ray_session, tiny_clip, tmp_path):
    pq.write_table(
        pa.table({"id": ["a", "b", "c", "d"], "text": ["fine", "", "", "also fine"]}), tmp_path / "m.parquet"
    )
    out = tmp_path / "out"
    rc = run_job(
        "pipelines.embed",
        ["--input", tmp_path / "m.parquet", "--output", out, "--model", tiny_clip, "--max-error-fraction", "0.25"],
    )
    assert rc == 3
    emb, errors, manifest = read_output(out)
    assert set(emb) == {"a", "d"} and set(errors) == {"b", "c"}
    assert manifest["status"] == "complete"


def test_unsupported_modality_fails_before_ray(minilm_path, tmp_path):
    """A text-only model and a media tree with images: exit 2 before Ray starts, saying what to do."""
    media = tmp_path / "media"
    media.mkdir()
    (media / "x.png").write_bytes(image_bytes(4))
    (media / "y.txt").write_text("hello")
    t0 = time.time()
    # The job's main() in a fresh process, which then says whether Ray was started before the refusal.
    probe = ("import sys; from pipelines import embed; rc = embed.main(sys.argv[1:]); ray = sys.modules.get('ray'); "
             "print('RAY STARTED' if ray is not None and ray.is_initialized() else 'NO RAY'); sys.exit(rc)")
    proc = subprocess.run(
        [sys.executable, "-c", probe, "--input", str(media), "--output", str(tmp_path / "out"), "--model", minilm_path],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "image" in proc.stderr and minilm_path in proc.stderr and "--on-unsupported" in proc.stderr
    assert proc.stdout.strip().endswith("NO RAY"), proc.stdout
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert time.time() - t0 < 60


def test_unsupported_modality_as_error_rows(ray_session, minilm_path, tmp_path):
    media = tmp_path / "media"
    (media / "sub").mkdir(parents=True)
    (media / "x.png").write_bytes(image_bytes(4))
    (media / "sub" / "y.txt").write_text("a text file in a media tree")
    out = tmp_path / "out"
    rc = run_job(
        "pipelines.embed",
        ["--input", media, "--output", out, "--model", minilm_path, "--on-unsupported", "error-row"],
    )
    assert rc == 0
    emb, errors, _ = read_output(out)
    assert set(emb) == {"sub/y.txt"}  # ids are paths relative to the root
    assert "does not support image" in errors["x.png"]["error"]


@pytest.mark.parametrize(
    "argv_extra, expect",
    [
        (["--model-kwargs", "not json"], "not valid JSON"),
        (["--max-error-fraction", "2"], "between 0 and 1"),
    ],
)
def test_option_errors(argv_extra, expect, tmp_path, minilm_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.embed", "--input", str(tmp_path), "--output", str(tmp_path / "o"),
         "--model", minilm_path, *argv_extra],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and expect in proc.stderr


def test_duplicate_ids_rejected_up_front(minilm_path, tmp_path):
    pq.write_table(pa.table({"id": ["a", "b", "a", "c", "c"], "text": ["1", "2", "3", "4", "5"]}), tmp_path / "m.parquet")
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.embed", "--input", str(tmp_path / "m.parquet"), "--output",
         str(tmp_path / "o"), "--model", minilm_path],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "2 duplicate ids" in proc.stderr and "'a'" in proc.stderr and "'c'" in proc.stderr


def test_missing_input_and_bad_model_fail_fast(tmp_path, minilm_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.embed", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"),
         "--model", minilm_path],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "input not found" in proc.stderr
    pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), tmp_path / "m.parquet")
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.embed", "--input", str(tmp_path / "m.parquet"), "--output",
         str(tmp_path / "o"), "--model", str(tmp_path / "no-such-model")],
        capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2 and f"model path {tmp_path / 'no-such-model'} does not exist" in proc.stderr
