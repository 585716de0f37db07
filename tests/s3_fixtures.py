"""A real S3 API for tests: `moto_server` on 127.0.0.1, a free port, buckets made with boto3.

Import the fixtures into a test module (`from tests.s3_fixtures import moto_server, s3  # noqa: F401`).
Ray workers of the shared test runtime may have started before these environment variables were
set, so jobs get the endpoint and the (dummy) credentials through `--storage-options` as well.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

# Dummy credentials moto accepts; distinctive, so tests can grep outputs and logs for leaks.
ACCESS_KEY = "AKIAMMEMBEDTESTKEY01"
SECRET_KEY = "mmembed-test-secret-9f3c2e"
REGION = "us-east-1"


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_executable() -> str:
    here = Path(sys.executable).parent / "moto_server"
    return str(here) if here.exists() else (shutil.which("moto_server") or "moto_server")


def wait_http(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {timeout_s} s")


@dataclass
class MotoServer:
    endpoint: str
    proc: subprocess.Popen

    def storage_options(self, endpoint: str | None = None) -> dict:
        return {
            "endpoint_url": endpoint or self.endpoint,
            "key": ACCESS_KEY,
            "secret": SECRET_KEY,
            "client_kwargs": {"region_name": REGION},
        }

    def boto3(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def new_bucket(self) -> str:
        name = f"mm-{uuid.uuid4().hex[:12]}"
        self.boto3().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def moto_server():
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    proc = subprocess.Popen(
        [moto_executable(), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # its own process group, so teardown reaches every child
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{endpoint}/moto-api/")
    except Exception:
        _stop(proc)
        raise
    # The standard AWS chain for code that creates its own clients (boto3, s3fs without key/secret).
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION})
    try:
        yield MotoServer(endpoint, proc)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture
def s3(moto_server):
    """A fresh bucket per test: (server, bucket name, storage options as JSON for --storage-options)."""
    bucket = moto_server.new_bucket()
    return moto_server, bucket, json.dumps(moto_server.storage_options())


def s3fs_for(server: MotoServer, endpoint: str | None = None):
    import s3fs

    opts = server.storage_options(endpoint)
    return s3fs.S3FileSystem(
        key=opts["key"], secret=opts["secret"], endpoint_url=opts["endpoint_url"],
        client_kwargs=opts["client_kwargs"], skip_instance_cache=True,
    )


def read_output_s3(fs, root: str):
    """(embedding by id, error row by id, manifest) of a finished embed job on S3; asserts no duplicates."""
    import numpy as np
    import pyarrow.parquet as pq

    fs.invalidate_cache()
    emb, errors, seen = {}, {}, 0
    for p in sorted(fs.glob(f"{root}/part-*.parquet")):
        with fs.open(p, "rb") as f:
            t = pq.read_table(f)
        vecs = np.asarray(t.column("embedding").combine_chunks().flatten()).reshape(t.num_rows, -1)
        for i, rid in enumerate(t.column("id").to_pylist()):
            emb[rid] = vecs[i]
            seen += 1
    assert seen == len(emb), "duplicate ids in output shards"
    seen = 0
    for p in sorted(fs.glob(f"{root}/_errors/errors-*.parquet")):
        with fs.open(p, "rb") as f:
            for row in pq.read_table(f).to_pylist():
                errors[row["id"]] = row
                seen += 1
    assert seen == len(errors), "duplicate ids in error shards"
    assert not set(emb) & set(errors), "an id is both written and an error"
    manifest = json.loads(fs.cat_file(f"{root}/_manifest.json"))
    return emb, errors, manifest
