"""`mmembed reembed`: incremental runs equal a full recompute, crashes leave CURRENT serving,
new settings go to a new version until activated, and bad input modifies nothing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_job
from tests.s3_fixtures import moto_server, s3  # noqa: F401

pytestmark = pytest.mark.slow

SMALL = ["--num-preprocessors", "1", "--num-encoders", "1", "--batch-size", "8"]


def corpus_v1() -> dict[str, str]:
    texts = {f"r{i:02d}": f"document {i} is about topic {i % 3} and item {i * 7}" for i in range(12)}
    texts["r05"] = ""  # an empty text: an error row on every run, retried each time
    return texts


def corpus_v2() -> dict[str, str]:
    texts = corpus_v1()
    for rid in ("r01", "r04", "r07"):
        texts[rid] = texts[rid] + " (edited)"
    del texts["r10"], texts["r11"]
    texts.update({"n1": "a brand new record", "n2": "another new one", "n3": "a third addition"})
    return texts


def write_manifest(path: Path, texts: dict[str, str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": list(texts), "text": list(texts.values())}), path)
    return str(path)


def reembed(input_: str, store: Path, model: str, *extra: str) -> int:
    return run_job("pipelines.reembed", ["--input", input_, "--store", store, "--model", model, *SMALL, *extra])


def current_dir(store: Path) -> Path:
    return store / json.loads((store / "CURRENT").read_text())["path"]


def read_snapshot(d: Path) -> tuple[dict[str, np.ndarray], dict[str, str], set[str], dict]:
    """(embedding by id, content hash by id, error ids, manifest) of a committed snapshot."""
    manifest = json.loads((d / "_manifest.json").read_text())
    emb, hashes = {}, {}
    for f in manifest["files"]:
        t = pq.read_table(d / f["name"])
        vecs = np.asarray(t.column("embedding").combine_chunks().flatten()).reshape(t.num_rows, -1)
        for i, (rid, h) in enumerate(zip(t.column("id").to_pylist(), t.column("content_hash").to_pylist())):
            assert rid not in emb, f"duplicate id {rid}"
            emb[rid], hashes[rid] = vecs[i], h
    errors = set()
    for f in manifest["error_files"]:
        errors |= set(pq.read_table(d / f["name"]).column("id").to_pylist())
    return emb, hashes, errors, manifest


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def v1_store(ray_session, minilm_path, tmp_path_factory) -> Path:
    """A store whose current version holds corpus v1, embedded by a first (full) run."""
    root = tmp_path_factory.mktemp("reembed")
    store = root / "store"
    assert reembed(write_manifest(root / "v1" / "m.parquet", corpus_v1()), store, minilm_path) == 0
    return store


@pytest.fixture(scope="module")
def v2_full(ray_session, minilm_path, tmp_path_factory) -> Path:
    """Corpus v2 embedded from scratch, in a store of its own: the reference for incremental runs."""
    root = tmp_path_factory.mktemp("reembed_full")
    store = root / "store"
    assert reembed(write_manifest(root / "v2" / "m.parquet", corpus_v2()), store, minilm_path, "--full") == 0
    return current_dir(store)


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_first_run_is_a_full_run_that_becomes_current(v1_store, minilm_path):
    from sentence_transformers import SentenceTransformer

    emb, hashes, errors, manifest = read_snapshot(current_dir(v1_store))
    texts = corpus_v1()
    assert manifest["store"]["mode"] == "full" and manifest["store"]["base_snapshot"] is None
    assert manifest["changes"] == {"new": 12, "changed": 0, "unchanged": 0, "deleted": 0, "embedded": 11}
    assert errors == {"r05"} and set(emb) == set(texts) - {"r05"}
    assert all(h and len(h) == 32 for h in hashes.values())
    ids = sorted(emb)
    ref = SentenceTransformer(minilm_path, device="cpu").encode([texts[i] for i in ids], convert_to_numpy=True)
    assert float(np.max(np.abs(np.stack([emb[i] for i in ids]) - ref))) <= 1e-5


def test_incremental_run_equals_full_recompute(v1_store, v2_full, minilm_path, tmp_path):
    store = copy_store(v1_store, tmp_path / "store")
    before_dir = current_dir(store)
    before = tree_digest(before_dir)
    old_emb, old_hashes, _, _ = read_snapshot(before_dir)

    assert reembed(write_manifest(tmp_path / "v2" / "m.parquet", corpus_v2()), store, minilm_path) == 0

    new_dir = current_dir(store)
    assert new_dir != before_dir and new_dir.parent == before_dir.parent, "same version, new snapshot"
    emb, hashes, errors, manifest = read_snapshot(new_dir)
    # 3 new; r01/r04/r07 edited + r05 (an error last time) changed; r10/r11 deleted; the rest carried.
    assert manifest["store"]["mode"] == "incremental"
    assert manifest["store"]["base_snapshot"] == before_dir.name
    assert manifest["changes"] == {"new": 3, "changed": 4, "unchanged": 6, "deleted": 2, "embedded": 6}
    assert manifest["counts"]["unaccounted"] == 0

    ref_emb, ref_hashes, ref_errors, _ = read_snapshot(v2_full)
    assert set(emb) == set(ref_emb) and errors == ref_errors == {"r05"}
    assert hashes == ref_hashes
    ids = sorted(ref_emb)
    diff = float(np.max(np.abs(np.stack([emb[i] for i in ids]) - np.stack([ref_emb[i] for i in ids]))))
    assert diff <= 1e-5, diff
    # Unchanged records were carried over, not recomputed: bit-identical to the base snapshot.
    for rid in ("r00", "r02", "r03", "r06", "r08", "r09"):
        assert np.array_equal(emb[rid], old_emb[rid]) and hashes[rid] == old_hashes[rid]
    assert hashes["r01"] != old_hashes["r01"]
    assert tree_digest(before_dir) == before, "the base snapshot must not be touched"

    # Nothing changed since: the next run embeds nothing and carries everything.
    assert reembed(str(tmp_path / "v2" / "m.parquet"), store, minilm_path) == 0
    again, _, _, manifest = read_snapshot(current_dir(store))
    assert manifest["changes"] == {"new": 0, "changed": 1, "unchanged": 12, "deleted": 0, "embedded": 0}
    assert all(np.array_equal(again[i], emb[i]) for i in emb)


def test_crash_mid_run_leaves_current_intact(v1_store, v2_full, minilm_path, tmp_path, ray_session):
    store = copy_store(v1_store, tmp_path / "store")
    pointer = (store / "CURRENT").read_bytes()
    serving = current_dir(store)
    served = tree_digest(serving)
    v2 = write_manifest(tmp_path / "v2" / "m.parquet", corpus_v2())
    address = ray_session.get_runtime_context().gcs_address
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.reembed", "--input", v2, "--store", str(store), "--model", minilm_path,
         "--address", address, *SMALL],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    try:
        # Kill the driver once the change pass has written its output: mid-run, before any commit.
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            if [p for p in serving.parent.glob("*/_changes/*.parquet") if p.parent.parent != serving]:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed: " + (tmp_path / "driver.log").read_text()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode == -signal.SIGKILL

    # Readers still get the old snapshot, whole; the half-built one is invisible.
    assert (store / "CURRENT").read_bytes() == pointer
    assert tree_digest(serving) == served
    half = [d for d in serving.parent.iterdir() if d.is_dir() and d != serving]
    assert len(half) == 1 and not (half[0] / "_manifest.json").exists()
    from mmembed.stores.store import Store, open_current

    assert open_current(str(store)) == str(serving)
    assert [v["snapshots"] for v in Store(str(store)).versions()] == [1]
    emb, _, errors, _ = read_snapshot(serving)
    assert set(emb) | errors == set(corpus_v1())

    # A rerun after the crash builds on the same committed base and matches a full recompute.
    assert reembed(v2, store, minilm_path) == 0
    emb, hashes, errors, manifest = read_snapshot(current_dir(store))
    assert manifest["store"]["base_snapshot"] == serving.name
    ref_emb, ref_hashes, ref_errors, _ = read_snapshot(v2_full)
    assert set(emb) == set(ref_emb) and errors == ref_errors and hashes == ref_hashes
    assert max(float(np.max(np.abs(emb[i] - ref_emb[i]))) for i in ref_emb) <= 1e-5


def test_new_settings_build_a_new_version_that_waits_for_activate(v1_store, minilm_path, tmp_path):
    store = copy_store(v1_store, tmp_path / "store")
    pointer = (store / "CURRENT").read_bytes()
    v1 = write_manifest(tmp_path / "v1" / "m.parquet", corpus_v1())

    assert reembed(v1, store, minilm_path, "--truncate-dim", "32") == 0
    assert (store / "CURRENT").read_bytes() == pointer, "a new version must not replace the current one by itself"
    listing = json.loads(
        subprocess.run(
            [sys.executable, "-m", "mmembed.cli", "versions", str(store), "--json"],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    by_id = {v["version"]: v for v in listing["versions"]}
    assert len(by_id) == 2
    (new_version,) = [k for k, v in by_id.items() if not v["current"]]
    assert by_id[new_version]["dim"] == 32 and by_id[new_version]["records"] == 11
    emb, _, _, manifest = read_snapshot(store / new_version / by_id[new_version]["latest_snapshot"])
    assert manifest["store"]["mode"] == "full" and manifest["changes"]["embedded"] == 11
    assert next(iter(emb.values())).shape == (32,)
    # ST itself with truncate_dim=32 on the same texts is the reference.
    from sentence_transformers import SentenceTransformer

    texts = {k: v for k, v in corpus_v1().items() if v}
    ref = SentenceTransformer(minilm_path, device="cpu", truncate_dim=32).encode(list(texts.values()))
    assert set(emb) == set(texts)
    assert max(float(np.max(np.abs(emb[i] - ref[j]))) for j, i in enumerate(texts)) <= 1e-5

    r = subprocess.run(
        [sys.executable, "-m", "mmembed.cli", "activate", str(store), new_version],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert current_dir(store).parent == store / new_version


def test_bad_store_root_is_refused_before_anything_runs(minilm_path, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("not a store")
    before = tree_digest(plain)
    v1 = write_manifest(tmp_path / "in" / "m.parquet", corpus_v1())
    assert reembed(v1, plain, minilm_path) == 2
    assert tree_digest(plain) == before
    # A bad input against a real store: refused in the plan step, the store untouched.
    store = tmp_path / "store"
    store.mkdir()
    assert reembed(str(tmp_path / "missing.parquet"), store, minilm_path) == 2
    assert list(store.iterdir()) == []
    # An unreachable cluster: refused at once instead of waiting on ray.init.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    started = time.time()
    assert reembed(v1, store, minilm_path, "--address", dead) == 2
    assert time.time() - started < 60 and list(store.iterdir()) == []


def test_media_changes_are_judged_by_their_bytes(ray_session, tiny_clip, tmp_path):
    """A media tree: rewritten-but-identical bytes carry over, new bytes are re-embedded."""
    from tests.helpers import image_bytes

    media = tmp_path / "media"
    media.mkdir()
    for name, seed in (("a.png", 1), ("b.png", 2), ("c.png", 3)):
        (media / name).write_bytes(image_bytes(seed))
    store = tmp_path / "store"
    assert reembed(str(media), store, tiny_clip) == 0
    first, first_hashes, _, _ = read_snapshot(current_dir(store))
    assert sorted(first) == ["a.png", "b.png", "c.png"]

    time.sleep(1.1)  # a later modification time for the rewritten file
    (media / "a.png").write_bytes(image_bytes(1))  # same bytes, new mtime: unchanged
    (media / "b.png").write_bytes(image_bytes(22))  # new bytes: changed
    (media / "c.png").unlink()  # deleted
    (media / "d.png").write_bytes(image_bytes(4))  # new
    assert reembed(str(media), store, tiny_clip) == 0
    emb, hashes, errors, manifest = read_snapshot(current_dir(store))
    assert manifest["changes"] == {"new": 1, "changed": 1, "unchanged": 1, "deleted": 1, "embedded": 2}
    assert sorted(emb) == ["a.png", "b.png", "d.png"] and not errors
    assert np.array_equal(emb["a.png"], first["a.png"]) and hashes["a.png"] == first_hashes["a.png"]
    assert hashes["b.png"] != first_hashes["b.png"]
    assert float(np.max(np.abs(emb["b.png"] - first["b.png"]))) > 1e-3

    full_store = tmp_path / "full"
    assert reembed(str(media), full_store, tiny_clip) == 0
    ref, ref_hashes, _, _ = read_snapshot(current_dir(full_store))
    assert hashes == ref_hashes
    assert max(float(np.max(np.abs(emb[i] - ref[i]))) for i in ref) <= 1e-5


# -- one writer per store ---------------------------------------------------------------------------
def test_a_held_local_store_refuses_a_second_run(minilm_path, tmp_path, capfd):
    from mmembed.outputs.runstate import RunLock

    store = tmp_path / "store"
    v1 = write_manifest(tmp_path / "in" / "m.parquet", corpus_v1())
    holder = RunLock(str(store), run="the first run").acquire()
    try:
        assert reembed(v1, store, minilm_path) == 2
        err = capfd.readouterr().err
        assert f"pid {os.getpid()} on {socket.gethostname()}" in err and "the first run" in err, err
        assert "since " in err and "--wait" in err
        assert sorted(p.name for p in store.iterdir()) == ["_lock.json"], "the refused run wrote nothing"
    finally:
        holder.release()


def test_reembed_on_s3_refuses_waits_for_and_takes_over_the_store_lease(ray_session, s3, minilm_path, tmp_path, capfd):
    """The lease lives at the store root on S3 (a conditional PUT): a held store refuses a second run
    (exit 2, naming the holder) or makes it wait with --wait, and a dead holder's lease is taken over."""
    import threading

    from mmembed.outputs.runstate import RunLock
    from tests.s3_fixtures import s3fs_for

    server, bucket, opts = s3
    fs = s3fs_for(server)
    root = f"s3://{bucket}/store"
    v1 = write_manifest(tmp_path / "in" / "m.parquet", corpus_v1())

    def run(*extra):
        return reembed(v1, root, minilm_path, "--storage-options", opts, *extra)

    def current_manifest():
        fs.invalidate_cache()
        pointer = json.loads(fs.cat_file(f"{bucket}/store/CURRENT"))
        return json.loads(fs.cat_file(f"{bucket}/store/{pointer['path']}/_manifest.json"))

    holder = RunLock(root, server.storage_options(), ttl_s=30, run="a scheduled reembed").acquire()
    assert run() == 2
    err = capfd.readouterr().err
    assert f"pid {os.getpid()} on {socket.gethostname()}" in err and "a scheduled reembed" in err, err
    started = time.time()
    assert run("--wait", "--wait-timeout", "1") == 2
    assert time.time() - started >= 1 and "gave up waiting after 1 s" in capfd.readouterr().err
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[-1] for p in fs.find(f"{bucket}/store")] == ["_lock.json"], "nothing written"

    # --wait: the run starts once the holder lets go, and then writes the store.
    release = threading.Timer(3.0, holder.release)
    started = time.time()
    release.start()
    try:
        assert run("--wait") == 0
    finally:
        release.join()
    assert time.time() - started >= 3.0
    assert "waiting for the store's lease" in capfd.readouterr().out
    first = current_manifest()
    assert first["changes"]["new"] == 12 and first["counts"]["unaccounted"] == 0
    assert not fs.exists(f"{bucket}/store/_lock.json")

    # A lease left by a driver of this host that died: taken over at once, no waiting for its TTL.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fs.pipe_file(f"{bucket}/store/_lock.json", json.dumps(
        {"owner": "crashed", "host": socket.gethostname(), "pid": dead.pid, "heartbeat": time.time(), "ttl_s": 600}
    ).encode())
    assert run() == 0
    second = current_manifest()
    assert second["store"]["base_snapshot"] == first["store"]["snapshot"]
    assert second["changes"]["unchanged"] == 11 and second["changes"]["embedded"] == 0
    assert not fs.exists(f"{bucket}/store/_lock.json")


def test_two_concurrent_reembeds_on_s3_one_writes_and_the_other_refuses_or_waits(ray_session, s3, minilm_path,
                                                                                  tmp_path):
    """Two real drivers (processes on the session's Ray) start at once on one S3 store. Without --wait
    exactly one commits a snapshot and the other exits 2 naming it; with --wait both run in turn, the
    second building on the first's commit. Ids with a unit separator, newlines and non-ASCII come
    back exactly, each with its own content hash (carried through the embed stages as a column)."""
    from mmembed.stages.content_hash import ContentHashStage
    from tests.s3_fixtures import s3fs_for

    server, bucket, opts = s3
    fs = s3fs_for(server)
    root = f"s3://{bucket}/store"
    # No error rows: the waited-for runs find everything unchanged and embed nothing, so they start no model.
    texts = {"plain": "a plain record", "unit\x1fsep\x1f": "an id holding the unit separator",
             "\x1fleading": "and one starting with it", "line\nbreak\ttab": "an id with a newline and a tab",
             "ünï cødé / 文字 ": "non-ASCII, a slash and a trailing space", "0123456789abcdef" * 2: "hex-like"}
    inp = write_manifest(tmp_path / "in" / "m.parquet", texts)
    address = ray_session.get_runtime_context().gcs_address
    repo = Path(__file__).resolve().parents[1]

    def start_both(*extra) -> list[tuple[subprocess.Popen, Path]]:
        runs = []
        for _ in range(2):
            log = tmp_path / f"driver-{uuid.uuid4().hex[:8]}.log"
            with open(log, "w") as out:
                runs.append((subprocess.Popen(
                    [sys.executable, "-m", "pipelines.reembed", "--input", inp, "--store", root, "--model", minilm_path,
                     "--address", address, "--storage-options", opts, *SMALL, *extra],
                    stdout=out, stderr=subprocess.STDOUT, cwd=repo, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                ), log))  # fmt: skip
        for proc, _ in runs:
            try:
                proc.wait(timeout=600)
            finally:
                if proc.poll() is None:
                    proc.kill()
        return [(proc, log.read_text()) for proc, log in runs]

    def manifests() -> dict[str, dict]:
        fs.invalidate_cache()
        found = [json.loads(fs.cat_file(p)) for p in fs.glob(f"{bucket}/store/*/*/*/_manifest.json")]
        return {m["store"]["snapshot"]: m for m in found}

    # Both at once, no --wait: one writes, the other is refused and names the writer's process.
    runs = start_both()
    assert sorted(p.returncode for p, _ in runs) == [0, 2], [log for _, log in runs]
    (winner, _), (_, refused) = sorted(runs, key=lambda r: r[0].returncode)
    assert f"is held by pid {winner.pid} on {socket.gethostname()}" in refused, refused
    assert f"mmembed reembed of {inp}" in refused and "--wait" in refused, refused
    (first,) = manifests().values()
    assert first["changes"]["new"] == len(texts) and first["counts"]["written"] == len(texts)
    snap = f"{bucket}/store/{first['store']['model_slug']}/{first['store']['version']}/{first['store']['snapshot']}"
    rows = []
    for f in first["files"]:
        with fs.open(f"{snap}/{f['name']}", "rb") as fh:
            rows += pq.read_table(fh, columns=["id", "content_hash"]).to_pylist()
    hasher = ContentHashStage()
    assert sorted((r["id"], r["content_hash"]) for r in rows) == sorted(
        (rid, hasher.digest({"text": t})) for rid, t in texts.items()
    )

    # Both at once with --wait: both commit, one after the other, the later on the earlier's snapshot.
    runs = start_both("--wait")
    assert [p.returncode for p, _ in runs] == [0, 0], [log for _, log in runs]
    waited = [log for _, log in runs if "waiting for the store's lease" in log]
    assert len(waited) == 1 and any(f"held by pid {p.pid} " in waited[0] for p, _ in runs), [log for _, log in runs]
    later = {m["store"]["base_snapshot"]: m for s, m in manifests().items() if s != first["store"]["snapshot"]}
    assert len(later) == 2 and first["store"]["snapshot"] in later, "each run built on the latest commit"
    second = later[first["store"]["snapshot"]]
    third = later[second["store"]["snapshot"]]
    for m in (second, third):
        assert m["changes"] == {"new": 0, "changed": 0, "unchanged": len(texts), "deleted": 0, "embedded": 0}
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/store/_lock.json")
