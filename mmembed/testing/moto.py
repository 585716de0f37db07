"""A real S3 API on this machine, for tests and benchmarks: `moto_server` on 127.0.0.1, a free port.

`moto_process` starts it in a process group of its own (so stopping it reaches every child), waits
until it answers, sets the AWS credential variables for clients that read the standard chain, and
undoes all of it on the way out. `storage_options`, `boto3_client` and `s3_filesystem` give the
clients that tests/s3_fixtures.py and benchmarks/fixtures.py talk to it with.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_executable() -> str:
    here = Path(sys.executable).parent / "moto_server"
    return str(here) if here.exists() else (shutil.which("moto_server") or "moto_server")


def wait_http(url: str, timeout_s: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and (proc is None or proc.poll() is None):
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {timeout_s} s")


def stop(proc: subprocess.Popen) -> None:
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


@contextlib.contextmanager
def moto_process(key: str, secret: str, region: str, timeout_s: float = 30.0):
    """The server for the duration of the block; yields (endpoint, process)."""
    creds = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": region}
    port = free_port()
    proc = subprocess.Popen([moto_executable(), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **creds}, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in creds}
    try:
        wait_http(f"{endpoint}/moto-api/", timeout_s, proc)
        os.environ.update(creds)
        yield endpoint, proc
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop(proc)


def storage_options(endpoint: str, key: str, secret: str, region: str) -> dict:
    """fsspec/s3fs storage options for the server (what a job's --storage-options carries)."""
    return {"endpoint_url": endpoint, "key": key, "secret": secret, "client_kwargs": {"region_name": region}}


def boto3_client(options: dict):
    """A boto3 S3 client from `storage_options` (buckets are made with it: s3fs's mkdir sends a
    location constraint that us-east-1 refuses)."""
    import boto3

    return boto3.client("s3", endpoint_url=options["endpoint_url"], aws_access_key_id=options["key"],
                        aws_secret_access_key=options["secret"], region_name=options["client_kwargs"]["region_name"])


def s3_filesystem(options: dict):
    """An s3fs filesystem from `storage_options`, not shared with other instances."""
    import s3fs

    return s3fs.S3FileSystem(key=options["key"], secret=options["secret"], endpoint_url=options["endpoint_url"],
                             client_kwargs=options["client_kwargs"], skip_instance_cache=True)


# Dummy credentials the moto server accepts (as tests/s3_fixtures.py).
MOTO_KEY, MOTO_SECRET, MOTO_REGION = "AKIAMMEMBEDBENCHKEY1", "mmembed-bench-secret", "us-east-1"


@contextlib.contextmanager
def moto_s3(timeout_s: float = 60.0):
    """A moto S3 server (mmembed/testing/moto.py) for the duration of the block; yields fsspec storage
    options (endpoint, dummy credentials)."""
    from mmembed.testing.moto import moto_process, storage_options

    with moto_process(MOTO_KEY, MOTO_SECRET, MOTO_REGION, timeout_s) as (endpoint, _):
        yield storage_options(endpoint, MOTO_KEY, MOTO_SECRET, MOTO_REGION)


def s3_bucket(storage_options: dict, bucket: str) -> None:
    """Make `bucket` on `moto_s3`'s server unless it is there."""
    from mmembed.testing.moto import boto3_client

    client = boto3_client(storage_options)
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
