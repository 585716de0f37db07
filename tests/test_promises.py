"""README promises that had no test of their own: the lease's heartbeat, duplicate-id accounting, run
identity refusals, a real decompression bomb, and attempts that name their shards."""

from __future__ import annotations

import json
import shutil
import struct
import time
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_job
from tests.helpers import image_bytes, read_output


def _texts(path, n=5):
    ids = [f"t{i}" for i in range(n)]
    pq.write_table(pa.table({"id": ids, "text": [f"text number {i}" for i in range(n)]}), path)
    return ids


def _embed(src, out, model, *extra):
    return run_job("pipelines.embed", ["--input", src, "--output", out, "--model", model, "--executor", "local", *extra])


def test_the_running_driver_renews_its_lease(tmp_path):
    from mmembed.outputs.runstate import LOCK_NAME, RunLock

    out = tmp_path / "out"
    lock = RunLock(str(out), ttl_s=0.4).acquire()  # renewed every quarter of the TTL
    try:
        first = json.loads((out / LOCK_NAME).read_text())["heartbeat"]
        time.sleep(0.5)
        second = json.loads((out / LOCK_NAME).read_text())["heartbeat"]
        assert second > first
        # Still held: another run (this process, another token) finds it live after more than a TTL.
        time.sleep(0.5)
        with pytest.raises(Exception, match="held|lease|running"):
            RunLock(str(out), ttl_s=0.4).acquire()
    finally:
        lock.release()
    assert not (out / LOCK_NAME).exists()


def test_duplicate_ids_counts_an_injected_duplicate(tiny_clip, tmp_path):
    from mmembed.outputs.runstate import account, committed_shards

    src = tmp_path / "m.parquet"
    _texts(src, 6)
    out = tmp_path / "out"
    assert _embed(src, out, tiny_clip, "--shard-rows", "2") == 0
    assert json.loads((out / "_manifest.json").read_text())["counts"]["duplicate_ids"] == 0
    first = sorted(out.glob("part-*.parquet"))[0]
    shutil.copy(first, out / "part-zz-copy.parquet")  # as a retried writer that renamed twice would leave it
    totals = account(*committed_shards(str(out), None), None)
    assert totals["duplicate_ids"] == pq.read_metadata(first).num_rows == 2


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_clip):
    root = tmp_path_factory.mktemp("identity")
    src = root / "m.parquet"
    _texts(src)
    out = root / "out"
    assert _embed(src, out, tiny_clip) == 0
    return src, out


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (["--revision", "v2"], "revision"),
        (["--task", "query"], "task"),
        (["--truncate-dim", "8"], "truncate_dim"),
        (["--model-kwargs", '{"dtype": "float32"}'], "model_kwargs"),
        (["--processor-kwargs", '{"do_resize": false}'], "processor_kwargs"),
        (["--split-modalities"], "split_modalities"),
        (["--normalize"], "normalize"),
        (["model"], "model"),
        (["input"], "input_uri"),
    ],
)
def test_every_identity_field_refuses_a_mixed_rerun(finished, tiny_clip, minilm_path, tmp_path, capsys, change, field):
    src, out = finished
    model, extra = tiny_clip, change
    if change == ["model"]:
        model, extra = minilm_path, []
    if change == ["input"]:
        src = shutil.copy(src, tmp_path / "same-records.parquet")
        extra = []
    before = sorted(p.name for p in out.rglob("*"))
    assert _embed(src, out, model, *extra) == 2
    err = capsys.readouterr().err
    assert "different identity" in err and f"{field}:" in err, err
    assert sorted(p.name for p in out.rglob("*")) == before


def _png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height pixels, with almost no pixel data: 67 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_a_real_decompression_bomb_becomes_an_error_row(tiny_clip, tmp_path):
    bomb = _png_bomb(100_000, 100_000)  # 10^10 pixels, 30 GB decoded
    assert len(bomb) < 100
    src = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["ok", "bomb"], "image": pa.array([image_bytes(1), bomb], pa.binary())}), src)
    out = tmp_path / "out"
    assert _embed(src, out, tiny_clip) == 0
    emb, errors, _ = read_output(out)
    assert set(emb) == {"ok"} and set(errors) == {"bomb"}
    reason = errors["bomb"]["error"]
    assert "--max-image-pixels" in reason and ("100000x100000" in reason or "10000000000 pixels" in reason), reason


def test_attempts_name_their_shards(tiny_clip, tmp_path):
    src = tmp_path / "m.parquet"
    ids = _texts(src, 8)
    out = tmp_path / "out"
    assert _embed(src, out, tiny_clip, "--shard-rows", "2") == 0
    # An attempt that died after committing some shards: no manifest, one shard lost.
    (out / "_manifest.json").unlink()
    lost = sorted(out.glob("part-*.parquet"))[0]
    lost.unlink()
    assert _embed(src, out, tiny_clip, "--shard-rows", "2") == 0
    emb, _, manifest = read_output(out)
    assert sorted(emb) == ids
    tokens = [a["run_token"] for a in manifest["attempts"]]
    assert len(tokens) == 2 and len(set(tokens)) == 2
    by_attempt = {t: [f["name"] for f in manifest["files"] if f["name"].startswith(f"part-{t}-")] for t in tokens}
    assert all(by_attempt.values())  # each attempt's shards carry its token
    assert sum(len(v) for v in by_attempt.values()) == len(manifest["files"])
    assert lost.name not in {f["name"] for f in manifest["files"]}


def test_a_retried_write_task_does_not_double_rows(tmp_path):
    """Ray reruns a write task whose worker died with the same blocks and task index: the rerun must
    commit the same shard names, replacing the first run's, so no row is written twice."""
    from mmembed.executors.local import TaskContext
    from mmembed.stages.write import ShardWriter

    def blocks():
        for start in range(0, 10, 4):
            n = min(4, 10 - start)
            yield pa.table({
                "id": [f"r{start + i}" for i in range(n)],
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array([0.5] * (2 * n), pa.float32()), 2),
                "modality": ["text"] * n,
                "stage": pa.nulls(n, pa.string()),
                "error": pa.nulls(n, pa.string()),
            })  # fmt: skip

    out = tmp_path / "out"
    writer = ShardWriter(str(out), result_columns=["id", "embedding", "modality"], shard_rows=3, run_token="tok")
    writer.on_write_start()
    first = writer.write(blocks(), TaskContext(task_idx=7))
    names = sorted(p.name for p in out.glob("part-*.parquet"))
    second = writer.write(blocks(), TaskContext(task_idx=7))  # the retry
    assert [f["name"] for f in first["files"]] == [f["name"] for f in second["files"]]
    assert sorted(p.name for p in out.glob("part-*.parquet")) == names
    ids = [i for p in out.glob("part-*.parquet") for i in pq.read_table(p).column("id").to_pylist()]
    assert sorted(ids) == sorted(f"r{i}" for i in range(10))


@pytest.mark.slow
def test_a_write_task_killed_after_committing_a_shard_is_retried_without_doubling_rows(
        ray_session, minilm_path, tmp_path):
    """The real embed job on Ray: the first write task to commit a shard kills its worker process.
    Ray retries that task with the same blocks and task index; its shards are written again under
    the same names, so every id lands once and the manifest lists exactly the files present."""
    from mmembed import cli
    from mmembed.jobs.embed import EmbedJob
    from mmembed.jobs.runner import run
    from mmembed.stages.write import ShardWriter
    from mmembed.testing.faults import DyingShardWriter
    from tests.test_resume import text_manifest

    m, out, marker = tmp_path / "m", tmp_path / "out", tmp_path / "died"
    ids = text_manifest(m, 200, files=4)
    argv = ["--input", str(m), "--output", str(out), "--model", minilm_path, "--shard-rows", "7",
            "--batch-size", "16", "--executor", "ray"]
    job = EmbedJob(cli.parse("embed", argv), replacements={ShardWriter: (DyingShardWriter, {"die_marker": str(marker)})})
    assert run(job) == 0
    assert marker.exists(), "no write task died"
    first_commit = marker.read_text()
    emb, errors, manifest = read_output(out)  # reads every part-*.parquet present, and checks no id twice
    assert not errors and sorted(emb) == sorted(ids)
    listed = sorted(f["name"] for f in manifest["files"])
    assert listed == sorted(p.name for p in out.glob("part-*.parquet"))
    assert first_commit in listed  # the dead task's shard was rewritten by its retry, not left beside it
    assert sum(f["rows"] for f in manifest["files"]) == len(ids)
    assert manifest["counts"]["duplicate_ids"] == 0 and manifest["counts"]["unaccounted"] == 0
    assert not [p for p in out.rglob("*.tmp")]
