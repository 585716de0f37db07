"""Transient storage failures (5xx, dropped connections) are retried with backoff; nothing is lost."""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmembed.testing.proxy import FaultyProxy
from tests.conftest import run_job
from tests.helpers import image_bytes
from tests.s3_fixtures import moto_server, read_output_s3, s3, s3fs_for  # noqa: F401 - fixtures


def _no_client_retries(opts: dict) -> dict:
    # botocore retries 5xx and dropped connections itself; switch that off to exercise mmembed's own.
    return {**opts, "config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}}}


def _fetcher(opts: dict, attempts: int, uri: str):
    from mmembed.storage.fetch import Fetcher

    f = Fetcher(opts, attempts=attempts)
    f._fs(uri).retries = 1  # s3fs's own retry loop too, so only mmembed's backoff remains
    return f


@pytest.mark.parametrize("kind", ["503", "500", "drop"])
def test_fetcher_retries_transient_failures_with_backoff(s3, kind):
    from mmembed.storage.fs import is_transient

    server, bucket, _ = s3
    uri = f"s3://{bucket}/img.png"
    s3fs_for(server).pipe_file(f"{bucket}/img.png", image_bytes(1))
    with FaultyProxy(server.endpoint) as proxy:
        opts = _no_client_retries(server.storage_options(proxy.endpoint))
        # Alone, each failure surfaces as an exception mmembed classifies as transient.
        # (aiohttp reconnects once by itself after a dropped pooled connection, hence two drops.)
        proxy.fail_next(2 if kind == "drop" else 1, kind)
        with pytest.raises(Exception) as info:
            _fetcher(opts, 1, uri).fetch(uri)
        assert is_transient(info.value), (repr(info.value), proxy.log)
        # With retries, three failures in a row are absorbed, waiting longer each time.
        proxy.fail_next(6 if kind == "drop" else 3, kind)
        before = proxy.requests
        started = time.monotonic()
        data = _fetcher(opts, 5, uri).fetch(uri)
        elapsed = time.monotonic() - started
    assert data == image_bytes(1)
    assert proxy.requests - before >= 4  # three failures, then the answer
    assert elapsed >= 0.2 * (1 + 2 + 4) * 0.5  # jittered backoff: 0.2 s x 2^k x [0.5, 1.5)


def test_missing_object_is_not_retried(s3):
    from mmembed.storage.fetch import FetchError

    server, bucket, _ = s3
    with FaultyProxy(server.endpoint) as proxy:
        opts = _no_client_retries(server.storage_options(proxy.endpoint))
        with pytest.raises(FetchError, match="not found"):
            _fetcher(opts, 5, f"s3://{bucket}/nope.png").fetch(f"s3://{bucket}/nope.png")
        assert proxy.requests <= 2  # one attempt (s3fs may HEAD then GET), no backoff loop


@pytest.mark.slow
def test_job_through_faulty_storage_completes_with_nothing_lost(ray_session, s3, tiny_clip):
    server, bucket, _ = s3
    fs = s3fs_for(server)
    n = 40
    ids = [f"r{i:03d}" for i in range(n)]
    for i in range(0, n, 2):
        fs.pipe_file(f"{bucket}/media/{ids[i]}.png", image_bytes(i))
    table = pa.table({
        "id": ids,
        "text": [None if i % 2 == 0 else f"caption {i}" for i in range(n)],
        "image": [f"s3://{bucket}/media/{ids[i]}.png" if i % 2 == 0 else None for i in range(n)],
    })
    with fs.open(f"{bucket}/in/m.parquet", "wb") as f:
        pq.write_table(table, f)
    # Every request to the store may fail: listing, manifest reads, media fetches, shard writes,
    # renames and the manifest. A seeded 15% of requests do, up to 40 faults.
    with FaultyProxy(server.endpoint, fail_fraction=0.15, max_faults=40, seed=7) as proxy:
        opts = json.dumps(server.storage_options(proxy.endpoint))
        rc = run_job("pipelines.embed", ["--input", f"s3://{bucket}/in/m.parquet", "--output", f"s3://{bucket}/out",
                                         "--model", tiny_clip, "--storage-options", opts, "--shard-rows", 8])
        injected = dict(proxy.faults)
    assert rc == 0
    assert sum(injected.values()) >= 10, injected  # the faults really happened
    emb, errors, manifest = read_output_s3(fs, f"{bucket}/out")
    assert errors == {}, errors
    assert sorted(emb) == ids
    assert manifest["counts"]["written"] == n and manifest["counts"]["duplicate_ids"] == 0
    for sub in ("out", "out/_errors"):  # no in-progress shard left, of this version's naming or an earlier one's
        assert not fs.glob(f"{bucket}/{sub}/.*.tmp") and not fs.glob(f"{bucket}/{sub}/.tmp-*")
