"""Object storage end to end against a real S3 API (moto_server): input, media, output, reruns,
bad objects, and no credential leaks."""

from __future__ import annotations

import json
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_job
from tests.helpers import image_bytes, media_server
from tests.s3_fixtures import (  # noqa: F401
    ACCESS_KEY,
    SECRET_KEY,
    moto_server,
    read_output_s3,
    s3,
    s3fs_for,
)


def _no_secrets(fs, root: str, *texts: str) -> None:
    fs.invalidate_cache()
    for path in fs.find(root):
        data = fs.cat_file(path)
        assert SECRET_KEY.encode() not in data and ACCESS_KEY.encode() not in data, path
    for text in texts:
        assert SECRET_KEY not in text and ACCESS_KEY not in text


@pytest.mark.slow
def test_s3_manifest_and_media_to_s3_output_rerun_and_resume(ray_session, s3, tiny_clip, capfd, monkeypatch):
    server, bucket, opts = s3
    fs = s3fs_for(server)
    corpus = f"{bucket}/corpus"
    for i in range(4):
        fs.pipe_file(f"{corpus}/media/img{i}.png", image_bytes(i))  # beside the manifest: relative paths
    fs.pipe_file(f"{bucket}/elsewhere/far.png", image_bytes(9))  # another prefix: an absolute URI
    rows = [
        ("rel-0", None, "media/img0.png"), ("rel-1", None, "media/img1.png"), ("rel-2", None, "media/img2.png"),
        ("rel-3", None, "media/img3.png"), ("abs", None, f"s3://{bucket}/elsewhere/far.png"),
        ("txt-0", "a photo of a cat", None), ("txt-1", "a diagram", None), ("txt-2", "a receipt", None),
        ("gone", None, "media/never-uploaded.png"), ("http", None, "http://127.0.0.1:9/refused.png"),
    ]
    table = pa.table({"id": [r[0] for r in rows], "text": [r[1] for r in rows], "image": [r[2] for r in rows]})
    with fs.open(f"{corpus}/manifest.parquet", "wb") as f:
        pq.write_table(table, f)
    out = f"{bucket}/emb"
    argv = ["--input", f"s3://{corpus}/manifest.parquet", "--output", f"s3://{out}", "--model", tiny_clip,
            "--storage-options", opts, "--shard-rows", 3]
    monkeypatch.setattr(sys, "argv", ["mmembed", "embed", *map(str, argv)])  # as the CLI would see it

    assert run_job("pipelines.embed", argv) == 0
    emb, errors, manifest = read_output_s3(fs, out)
    assert set(emb) == {r[0] for r in rows} - {"gone", "http"}
    assert errors["gone"]["error"].startswith("not found:") and "never-uploaded.png" in errors["gone"]["error"]
    assert "--allow-http" in errors["http"]["error"]
    assert manifest["status"] == "complete" and manifest["counts"]["unaccounted"] == 0
    assert manifest["counts"]["written"] == 8 and manifest["counts"]["errors"] == 2
    assert "***" in " ".join(manifest["command_line"])
    first_shards = sorted(f["name"] for f in manifest["files"])
    assert len(first_shards) >= 3

    # The same command again: the output is complete, nothing runs, nothing changes.
    before = fs.cat_file(f"{out}/_manifest.json")
    assert run_job("pipelines.embed", argv) == 0
    assert "nothing to do" in capfd.readouterr().out
    assert fs.cat_file(f"{out}/_manifest.json") == before

    # A crash after some shards were committed: no manifest, one shard lost in flight, a half-written
    # leftover. The rerun keeps the committed shards and embeds only what is missing.
    lost = first_shards[0]
    lost_rows = pq.read_table(fs.open(f"{out}/{lost}", "rb")).num_rows
    fs.rm(f"{out}/_manifest.json")
    fs.rm(f"{out}/{lost}")
    fs.pipe_file(f"{out}/.tmp-deadbeef-{lost}", b"half a parquet file")  # an earlier version's naming
    fs.pipe_file(f"{out}/.{lost}.cafef00d.tmp", b"half a parquet file")
    assert run_job("pipelines.embed", argv) == 0
    emb2, errors2, manifest2 = read_output_s3(fs, out)
    assert set(emb2) == set(emb) and set(errors2) == set(errors)
    names = sorted(f["name"] for f in manifest2["files"])
    assert set(first_shards) - {lost} <= set(names) and lost not in names
    assert manifest2["counts"]["resumed_from_committed"] == 10 - lost_rows
    assert manifest2["counts"]["written"] == 8 and manifest2["counts"]["duplicate_ids"] == 0
    assert len(manifest2["attempts"]) == 2
    assert not fs.glob(f"{out}/.tmp-*") and not fs.glob(f"{out}/.*.tmp") and not fs.exists(f"{out}/_lock.json")
    for rid in emb:  # the same model on the same bytes
        assert abs(emb[rid] - emb2[rid]).max() <= 1e-5

    captured = capfd.readouterr()
    _no_secrets(fs, out, captured.out, captured.err)
    run_record = json.loads(fs.cat_file(f"{out}/_run.json"))
    assert run_record["storage_options"]["secret"] == "***" and run_record["storage_options"]["key"] == "***"


@pytest.mark.slow
def test_bad_objects_on_s3_become_error_rows(ray_session, s3, tiny_clip, monkeypatch):
    from mmembed.jobs import embed

    server, bucket, opts = s3
    fs = s3fs_for(server)
    tree = f"{bucket}/tree"
    fs.pipe_file(f"{tree}/ok/a.png", image_bytes(1))
    fs.pipe_file(f"{tree}/ok/b.jpg", image_bytes(2, fmt="JPEG"))
    fs.pipe_file(f"{tree}/ok/c.txt", b"plain text from a file")
    fs.pipe_file(f"{tree}/bad/zero.png", b"")
    fs.pipe_file(f"{tree}/bad/corrupt.png", b"\x89PNG\r\n\x1a\n but then garbage")
    fs.pipe_file(f"{tree}/bad/huge.png", image_bytes(3, size=(400, 400)))  # over --max-bytes below
    fs.pipe_file(f"{tree}/bad/deleted.png", image_bytes(4))
    limit = len(image_bytes(1)) * 3

    real_plan = embed.plan

    def plan_then_delete(cfg, **kwargs):
        p = real_plan(cfg, **kwargs)  # the listing has seen deleted.png ...
        fs.rm(f"{tree}/bad/deleted.png")  # ... which is gone before any worker reads it
        return p

    monkeypatch.setattr(embed, "plan", plan_then_delete)
    out = f"{bucket}/out"
    rc = run_job("pipelines.embed", ["--input", f"s3://{tree}/", "--output", f"s3://{out}", "--model", tiny_clip,
                                     "--storage-options", opts, "--max-bytes", limit])
    assert rc == 0
    emb, errors, manifest = read_output_s3(fs, out)
    assert set(emb) == {"ok/a.png", "ok/b.jpg", "ok/c.txt"}
    reasons = {k: v["error"] for k, v in errors.items()}
    assert set(reasons) == {"bad/zero.png", "bad/corrupt.png", "bad/huge.png", "bad/deleted.png"}
    assert "zero-byte object" in reasons["bad/zero.png"]
    assert "undecodable image" in reasons["bad/corrupt.png"]
    assert f"{limit}-byte limit (--max-bytes)" in reasons["bad/huge.png"]
    assert reasons["bad/deleted.png"].startswith("not found:")
    assert manifest["counts"]["records"] == 7 and manifest["counts"]["unaccounted"] == 0


def test_duplicate_ids_in_an_s3_manifest_are_rejected_up_front(s3, tiny_clip, capsys):
    server, bucket, opts = s3
    fs = s3fs_for(server)
    for name, ids in (("a", ["x", "y", "dup-1", "dup-2"]), ("b", ["dup-1", "z", "dup-2"])):
        with fs.open(f"{bucket}/m/{name}.parquet", "wb") as f:
            pq.write_table(pa.table({"id": ids, "text": ["t"] * len(ids)}), f)
    rc = run_job("pipelines.embed", ["--input", f"s3://{bucket}/m/", "--output", f"s3://{bucket}/out",
                                     "--model", tiny_clip, "--storage-options", opts])
    assert rc == 2
    err = capsys.readouterr().err
    assert "2 duplicate ids" in err and "'dup-1'" in err and "'dup-2'" in err
    assert not fs.exists(f"{bucket}/out")  # refused before anything was written


# -- HTTP(S) media -----------------------------------------------------------------------------------
def test_http_media_needs_allow_http_and_obeys_timeout_and_size():
    from mmembed.storage.fetch import Fetcher, FetchError

    small, big = image_bytes(1), image_bytes(2, size=(300, 300))
    with media_server({"/small.png": small, "/big.png": big, "/slow.png": small}) as base:
        with pytest.raises(FetchError, match="--allow-http"):
            Fetcher().fetch(f"{base}/small.png")
        fetcher = Fetcher(allow_http=True, max_bytes=len(small) + 10, http_timeout_s=1.0, attempts=2)
        assert fetcher.fetch(f"{base}/small.png") == small
        with pytest.raises(FetchError, match="byte limit"):
            fetcher.fetch(f"{base}/big.png")
        started = time.monotonic()
        with pytest.raises(Exception) as info:
            fetcher.fetch(f"{base}/slow.png")
        assert time.monotonic() - started < 2.9 * 2  # each try gave up at the 1 s timeout
        assert isinstance(info.value, FetchError) and "timed out" in str(info.value)


def test_lease_on_s3_is_exclusive_under_a_race(s3):
    from mmembed.errors import UsageError
    from mmembed.outputs.runstate import RunLock

    server, bucket, _ = s3
    opts = server.storage_options()
    out = f"s3://{bucket}/out"
    winners, refused = [], []
    start = threading.Barrier(4)

    def contend():
        lock = RunLock(out, opts, ttl_s=30)
        start.wait()
        try:
            winners.append(lock.acquire())
        except UsageError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # A conditional PUT (If-None-Match: *) lets exactly one through.
    assert len(winners) == 1 and len(refused) == 3, (winners, refused)
    held = json.loads(s3fs_for(server).cat_file(f"{bucket}/out/_lock.json"))
    assert held["owner"] == winners[0].token and SECRET_KEY not in json.dumps(held)
    winners[0].release()
    assert not s3fs_for(server).exists(f"{bucket}/out/_lock.json")


def test_listing_media_on_s3_sends_no_request_per_file(s3, monkeypatch):
    """Discovery fingerprints the input from the listing itself: a million-object prefix must not
    cost a million HEAD requests on the driver before the job starts."""
    import collections

    import s3fs

    from mmembed.inputs.discover import discover

    server, bucket, opts = s3
    fs = s3fs_for(server)
    for i in range(40):
        fs.pipe_file(f"{bucket}/media/sub{i % 2}/img{i:02d}.png", image_bytes(i))
    calls = collections.Counter()
    original = s3fs.S3FileSystem._call_s3

    async def counting(self, method, *args, **kwargs):
        calls[method if isinstance(method, str) else method.__name__] += 1
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)
    options = {**json.loads(opts), "skip_instance_cache": True}  # no listing cached by an earlier test
    spec = discover(f"s3://{bucket}/media", options)
    assert spec.num_records == 40 and spec.kind == "media"
    assert calls["head_object"] == 0, calls
    assert sum(calls.values()) <= 4, calls
    globbed = discover(f"s3://{bucket}/media/sub1/*.png", options)
    assert globbed.num_records == 20 and calls["head_object"] == 0, calls

    # The fingerprint still sees a changed object (its ETag), as a rerun's conflict check needs.
    fs.pipe_file(f"{bucket}/media/sub0/img00.png", image_bytes(99))
    assert discover(f"s3://{bucket}/media", options).fingerprint != spec.fingerprint
