"""A real S3 API for tests: `moto_server` on 127.0.0.1, a free port, buckets made with boto3.

Import the fixtures into a test module (`from tests.s3_fixtures import moto_server, s3  # noqa: F401`).
Ray workers of the shared test runtime may have started before these environment variables were
set, so jobs get the endpoint and the (dummy) credentials through `--storage-options` as well.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from dataclasses import dataclass

import pytest

from mmembed.testing import moto
from mmembed.testing.moto import moto_process

# Dummy credentials moto accepts; distinctive, so tests can grep outputs and logs for leaks.
ACCESS_KEY = "AKIAMMEMBEDTESTKEY01"
SECRET_KEY = "mmembed-test-secret-9f3c2e"
REGION = "us-east-1"


@dataclass
class MotoServer:
    endpoint: str
    proc: subprocess.Popen

    def storage_options(self, endpoint: str | None = None) -> dict:
        return moto.storage_options(endpoint or self.endpoint, ACCESS_KEY, SECRET_KEY, REGION)

    def boto3(self):
        return moto.boto3_client(self.storage_options())

    def new_bucket(self) -> str:
        name = f"mm-{uuid.uuid4().hex[:12]}"
        self.boto3().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def moto_server():
    with moto_process(ACCESS_KEY, SECRET_KEY, REGION) as (endpoint, proc):
        yield MotoServer(endpoint, proc)


@pytest.fixture
def s3(moto_server):
    """A fresh bucket per test: (server, bucket name, storage options as JSON for --storage-options)."""
    bucket = moto_server.new_bucket()
    return moto_server, bucket, json.dumps(moto_server.storage_options())


def s3fs_for(server: MotoServer, endpoint: str | None = None):
    return moto.s3_filesystem(server.storage_options(endpoint))


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
