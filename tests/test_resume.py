"""Crash-safe runs: SIGKILL and resume, a killed encoder actor, conflicting and concurrent runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_job
from tests.helpers import read_output

REPO = Path(__file__).resolve().parents[1]


def text_manifest(path: Path, n: int, prefix: str = "t", files: int = 1) -> list[str]:
    """A text manifest at `path` (a file, or with files > 1 a directory of that many files: many read
    tasks, so records stream through the pipeline instead of arriving as one block)."""
    ids = [f"{prefix}{i:05d}" for i in range(n)]
    texts = [f"record {i}: " + " ".join(["word"] * (i % 7 + 1)) for i in range(n)]
    table = pa.table({"id": ids, "text": texts})
    if files == 1:
        pq.write_table(table, path)
        return ids
    path.mkdir(parents=True, exist_ok=True)
    step = -(-n // files)
    for k in range(files):
        pq.write_table(table.slice(k * step, step), path / f"part-{k:03d}.parquet")
    return ids


def assert_same_embeddings(a: dict, b: dict) -> None:
    """Equal up to fp32 noise: the two runs batch (and so pad) the same records differently.

    The tiny model's vectors are unnormalised, with entries up to about 12, so that noise reaches
    1.2e-5 absolute (seen once in 48,000 values, on an entry of 0.206); a record embedded wrongly
    or swapped with another differs by whole units."""
    assert set(a) == set(b)
    ids = sorted(a)
    np.testing.assert_allclose(np.stack([a[i] for i in ids]), np.stack([b[i] for i in ids]), rtol=1e-5, atol=5e-5)


# -- the lease --------------------------------------------------------------------------------------
def test_lease_is_exclusive_under_a_race(tmp_path):
    from mmembed.errors import UsageError
    from mmembed.outputs.runstate import RunLock

    out = str(tmp_path / "out")
    winners, refused = [], []
    start = threading.Barrier(6)

    def contend():
        lock = RunLock(out, ttl_s=30)
        start.wait()
        try:
            lock.acquire()
            winners.append(lock)
        except UsageError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=contend) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(refused) == 5
    assert "another run is writing to this output" in refused[0]
    winners[0].release()
    assert not (Path(out) / "_lock.json").exists()
    RunLock(out).acquire().release()  # free again once released


def test_lease_works_where_the_filesystem_has_no_hard_links(tmp_path, monkeypatch):
    from mmembed.errors import UsageError
    from mmembed.outputs.runstate import RunLock

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("os.link", no_links)
    out = str(tmp_path / "out")
    held = RunLock(out, ttl_s=30).acquire()
    with pytest.raises(UsageError, match="another run is writing to this output"):
        RunLock(out, ttl_s=30).acquire()
    held.release()
    assert sorted(p.name for p in Path(out).iterdir()) == []  # no lock, no temporary file left


def test_stale_leases_are_taken_over_live_ones_are_not(tmp_path):
    import socket

    from mmembed.errors import UsageError
    from mmembed.outputs.runstate import RunLock

    out = tmp_path / "out"
    out.mkdir()
    lock_file = out / "_lock.json"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # A crashed driver on this host: its pid is gone, so the lease is free at once.
    lock_file.write_text(json.dumps({"owner": "x", "host": socket.gethostname(), "pid": dead.pid,
                                     "heartbeat": time.time(), "ttl_s": 600}))
    RunLock(str(out)).acquire().release()
    # A live holder on another host with a fresh heartbeat keeps it.
    lock_file.write_text(json.dumps({"owner": "y", "host": "elsewhere", "pid": 1, "heartbeat": time.time(),
                                     "ttl_s": 600}))
    with pytest.raises(UsageError, match="held by pid 1 on elsewhere"):
        RunLock(str(out)).acquire()
    # ... until its heartbeat is older than its TTL.
    lock_file.write_text(json.dumps({"owner": "y", "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 700,
                                     "ttl_s": 600}))
    RunLock(str(out)).acquire().release()


# -- SIGKILL the driver, rerun, compare --------------------------------------------------------------
def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the driver at once, then every process of its session: the embedded Ray it started
    (GCS, raylet, workers) outlives a SIGKILLed driver otherwise."""
    import psutil

    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    leftovers = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid:
                p.kill()
                leftovers.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass
    psutil.wait_procs(leftovers, timeout=30)


@pytest.mark.slow
def test_sigkill_driver_mid_run_then_resume_equals_uninterrupted_run(ray_session, tiny_clip, tmp_path):
    m = tmp_path / "m"
    ids = text_manifest(m, 3000, files=60)
    out, ref = tmp_path / "out", tmp_path / "ref"
    argv = ["--input", m, "--output", out, "--model", tiny_clip, "--shard-rows", 25,
            "--batch-size", 2, "--preprocess-batch-size", 4]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp_path / "driver.log", "wb")
    # Its own process group and its own embedded Ray, not the test session's runtime.
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.embed", *map(str, argv)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 420
        while not (out / "_lock.json").exists():
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.time() < deadline, "the driver never took the lease"
            time.sleep(0.2)
        # A second run into the same output while the first holds it: refused before Ray starts.
        assert run_job("pipelines.embed", argv) == 2
        while not list(out.glob("part-*.parquet")):
            assert proc.poll() is None, "finished before it could be killed: " + (tmp_path / "driver.log").read_text()[-3000:]
            assert time.time() < deadline, "no shard appeared in time"
            time.sleep(0.02)
    finally:
        _kill_session(proc)
        log.close()
    assert not (out / "_manifest.json").exists(), "the driver was not killed mid-run"
    first = {p.name for p in out.glob("part-*.parquet")} | {p.name for p in (out / "_errors").glob("errors-*.parquet")}
    committed_before = sum(pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet"))
    assert 0 < committed_before < len(ids)

    assert run_job("pipelines.embed", argv) == 0  # the same command resumes
    assert run_job("pipelines.embed", [*argv[:3], ref, *argv[4:]]) == 0  # an uninterrupted run

    emb, errors, manifest = read_output(out)  # read_output asserts no duplicate ids
    ref_emb, ref_errors, _ = read_output(ref)
    assert not errors and not ref_errors
    assert sorted(emb) == sorted(ids)
    assert_same_embeddings(emb, ref_emb)
    # Finished shards of the killed attempt were kept, not recomputed; the manifest lists every shard.
    names = {f["name"] for f in manifest["files"]} | {f["name"] for f in manifest["error_files"]}
    assert first <= names
    assert names == {p.name for p in out.glob("part-*.parquet")}
    assert manifest["counts"]["resumed_from_committed"] == committed_before
    assert manifest["counts"]["written"] == len(ids) and manifest["counts"]["unaccounted"] == 0
    assert manifest["counts"]["duplicate_ids"] == 0
    assert len(manifest["attempts"]) == 2
    assert not list(out.glob(".*.tmp")) and not list(out.glob(".tmp-*")) and not (out / "_lock.json").exists()


# -- a killed encoder actor -------------------------------------------------------------------------
def _alive_actors(ray):
    """(actor id, repr name) of live actors. The state API needs a dashboard, which the test
    runtime does not start; the GCS actor table has the same facts."""
    from ray.core.generated import gcs_pb2

    try:
        from ray.util.state import list_actors

        rows = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")],
                           raise_on_missing_output=False)
        return [(a.actor_id, a.repr_name or "") for a in rows]
    except Exception:  # noqa: BLE001 - no dashboard: read the GCS table
        accessor = ray._private.state.state._connect_and_get_accessor()
        out = []
        for raw in accessor.get_actor_table(None, "ALIVE"):
            a = gcs_pb2.ActorTableData.FromString(raw)
            out.append((a.actor_id.hex(), a.repr_name))
        return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["EncodeStage", "PreprocessStage"])
def test_killed_actor_is_restarted_and_every_record_lands(ray_session, tiny_clip, tmp_path, stage):
    ray = ray_session
    m = tmp_path / "m"
    # Enough records that encoding outlasts the killer's polling by seconds even on a loaded
    # machine: with 1500 the encoder finished about 2 s after it came up, and CI once missed it.
    ids = text_manifest(m, 5000, files=50)
    out = tmp_path / "out"
    killed, failures = [], []

    def killer():
        try:
            deadline = time.time() + 600
            alive_since = None
            while time.time() < deadline and not killed:
                encoders = [a for a in _alive_actors(ray) if stage in a[1]]
                if encoders and alive_since is None:
                    alive_since = time.time()
                # Mid-run: the encoder is up and has had time to take batches, or already wrote some.
                if encoders and (list(out.glob("part-*.parquet")) or time.time() - alive_since > 0.5):
                    actor_id, name = encoders[0]
                    ray.kill(_handle(ray, actor_id), no_restart=False)
                    killed.append((actor_id, name, len(list(out.glob("part-*.parquet")))))
                    return
                time.sleep(0.05)
        except Exception as exc:  # noqa: BLE001 - reported by the test below
            failures.append(repr(exc))

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    rc = run_job("pipelines.embed", ["--input", m, "--output", out, "--model", tiny_clip, "--shard-rows", 30,
                                     "--batch-size", 4, "--preprocess-batch-size", 8])
    t.join(timeout=5)
    assert not failures, failures
    print("killed", killed, "shards at the end", len(list(out.glob("part-*.parquet"))))
    assert rc == 0
    assert killed, f"no {stage} actor was found alive mid-run"
    assert _restarts(ray, killed[0][0]) >= 1  # Ray restarted it (max_restarts=-1) and retried its work
    emb, errors, manifest = read_output(out)
    assert not errors
    assert sorted(emb) == sorted(ids)
    assert manifest["counts"]["duplicate_ids"] == 0 and manifest["counts"]["unaccounted"] == 0


def _restarts(ray, actor_id_hex: str) -> int:
    from ray.core.generated import gcs_pb2

    accessor = ray._private.state.state._connect_and_get_accessor()
    return gcs_pb2.ActorTableData.FromString(accessor.get_actor_info(ray.ActorID.from_hex(actor_id_hex))).num_restarts


def _handle(ray, actor_id_hex: str):
    """A handle on an actor this driver did not create (Ray Data's pool), as runtime_context builds one."""
    return ray._private.worker.global_worker.core_worker.get_actor_handle(ray.ActorID.from_hex(actor_id_hex))


# -- reruns: same command, conflicting identity ------------------------------------------------------
def test_rerun_is_a_no_op_and_a_conflicting_rerun_refuses(ray_session, tiny_clip, tmp_path, capsys):
    m = tmp_path / "m.parquet"
    ids = text_manifest(m, 12)
    out = tmp_path / "out"
    argv = ["--input", m, "--output", out, "--model", tiny_clip]
    assert run_job("pipelines.embed", argv) == 0
    before = (out / "_manifest.json").read_text()
    shards = sorted(p.name for p in out.glob("part-*.parquet"))
    capsys.readouterr()

    assert run_job("pipelines.embed", argv) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "_manifest.json").read_text() == before
    assert sorted(p.name for p in out.glob("part-*.parquet")) == shards

    assert run_job("pipelines.embed", [*argv, "--prompt", "query: "]) == 2
    err = capsys.readouterr().err
    assert "different identity" in err and "prompt" in err and "--overwrite" in err

    text_manifest(m, 13)  # the input changed: another fingerprint
    assert run_job("pipelines.embed", argv) == 2
    assert "input_fingerprint" in capsys.readouterr().err

    # An interrupted run of another identity is refused the same way.
    (out / "_manifest.json").unlink()
    assert run_job("pipelines.embed", [*argv, "--normalize"]) == 2
    assert "unfinished run" in capsys.readouterr().err

    assert run_job("pipelines.embed", [*argv, "--overwrite"]) == 0
    emb, _, manifest = read_output(out)
    assert len(emb) == 13 and manifest["counts"]["records"] == 13 and len(manifest["attempts"]) == 1
    assert set(ids) < set(emb)


def test_retry_errors_embeds_failed_records_again_and_keeps_the_rest(ray_session, tiny_clip, tmp_path, capsys):
    from tests.helpers import image_bytes

    media = tmp_path / "media"
    media.mkdir()
    for i in range(3):
        (media / f"img{i}.png").write_bytes(image_bytes(i))
    m = tmp_path / "m.parquet"
    pq.write_table(pa.table({
        "id": ["img0", "img1", "img2", "late", "txt"],
        "image": ["media/img0.png", "media/img1.png", "media/img2.png", "media/late.png", None],
        "text": [None, None, None, None, "a caption"],
    }), m)
    out = tmp_path / "out"
    argv = ["--input", m, "--output", out, "--model", tiny_clip]
    assert run_job("pipelines.embed", argv) == 0
    emb, errors, manifest = read_output(out)
    assert set(errors) == {"late"} and "not found" in errors["late"]["error"]
    kept = {p.name: p.read_bytes() for p in out.glob("part-*.parquet")}
    assert "--retry-errors to embed the 1 error record(s) again" in capsys.readouterr().out

    # A plain rerun keeps the error row, and says how to retry it.
    assert run_job("pipelines.embed", argv) == 0
    assert "--retry-errors" in capsys.readouterr().out
    (media / "late.png").write_bytes(image_bytes(7))  # the missing upload arrives

    assert run_job("pipelines.embed", [*argv, "--retry-errors"]) == 0
    emb2, errors2, manifest2 = read_output(out)
    assert errors2 == {} and set(emb2) == {"img0", "img1", "img2", "late", "txt"}
    assert manifest2["counts"]["errors"] == 0 and manifest2["counts"]["unaccounted"] == 0
    assert manifest2["counts"]["retried_errors"] == 1 and manifest2["counts"]["resumed_from_committed"] == 4
    assert len(manifest2["attempts"]) == 2
    # Records embedded before are not embedded again: their shards are the same files.
    assert {p.name: p.read_bytes() for p in out.glob("part-*.parquet") if p.name in kept} == kept
    alone, _, _ = read_output(run_and_read(tmp_path, tiny_clip, media / "late.png"))
    np.testing.assert_allclose(emb2["late"], alone["late.png"], rtol=1e-5, atol=1e-5)

    # Nothing failed this time: a further --retry-errors has nothing to do.
    capsys.readouterr()
    assert run_job("pipelines.embed", [*argv, "--retry-errors"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def run_and_read(tmp_path: Path, model: str, image: Path) -> Path:
    """Embed one image file alone (a media-directory job); the output directory."""
    src = tmp_path / "alone"
    src.mkdir()
    (src / image.name).write_bytes(image.read_bytes())
    out = tmp_path / "alone-out"
    assert run_job("pipelines.embed", ["--input", src, "--output", out, "--model", model]) == 0
    return out
