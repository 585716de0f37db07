"""Every URI goes through fsspec, so local paths, s3://, gs:// and az:// behave the same."""

from __future__ import annotations

import errno
import posixpath
import random
import time

import fsspec
from fsspec.core import url_to_fs


class FetchError(Exception):
    """A record's media could not be fetched; the message becomes the error row's reason."""


def protocol_of(uri: str) -> str:
    if "://" in uri:
        return uri.split("://", 1)[0].lower()
    return "file"


def filesystem(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for a URI and the path within it.

    Storage options only apply to object stores; local paths ignore them so one
    `--storage-options` can serve an S3 input and a local output alike.
    """
    opts = dict(storage_options or {}) if protocol_of(uri) not in ("file", "local") else {}
    return url_to_fs(uri, **opts)


def join_uri(base: str, rel: str) -> str:
    if protocol_of(base) == "file":
        import os

        return os.path.join(base, rel)
    return posixpath.join(base.rstrip("/"), rel)


def is_absolute_uri(uri: str) -> bool:
    return "://" in uri or uri.startswith("/")


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn an fsspec-internal path back into a URI that another process can open."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return f"{protocol}://{path}"


# Errors worth another try: object stores answer 5xx or drop connections under load.
_TRANSIENT_NAMES = (
    "ConnectionError",
    "ConnectionClosedError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "EndpointConnectionError",
    "ServerDisconnectedError",
    "ClientPayloadError",
    "ClientOSError",
    "IncompleteRead",
    "ProtocolError",
    "ResponseStreamingError",
    "TimeoutError",
)


def is_transient(exc: BaseException, _depth: int = 0) -> bool:
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError, FetchError)):
        return False
    status = getattr(exc, "status", None)  # aiohttp's HTTP errors carry the response status
    if isinstance(status, int) and 100 <= status < 600:
        return status >= 500 or status == 429
    text = f"{type(exc).__name__}: {exc}"
    if any(name in text for name in _TRANSIENT_NAMES):
        return True
    for code in ("500", "502", "503", "504", "SlowDown", "InternalError", "ServiceUnavailable"):
        if code in text:
            return True
    # s3fs turns a 503 SlowDown into OSError(EBUSY, "Service Unavailable") and a 500 into
    # OSError(EREMOTEIO): judge by errno, and by the HTTP status of the ClientError behind it.
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    cause = exc.__cause__
    status = (getattr(cause, "response", None) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    if isinstance(status, int) and (status >= 500 or status == 429):
        return True
    for inner in (cause, exc.__context__):
        if inner is not None and inner is not exc and _depth < 4 and is_transient(inner, _depth + 1):
            return True
    return isinstance(exc, (ConnectionError, TimeoutError))


_TRANSIENT_ERRNOS = {
    errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED,
    errno.EPIPE, getattr(errno, "EREMOTEIO", 121),
}


def with_retries(fn, *, attempts: int = 5, base_delay: float = 0.2, max_delay: float = 5.0, transient=None):
    """Call fn, retrying transient storage errors (`transient`, default `is_transient`) with jittered
    exponential backoff."""
    transient = transient or is_transient
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classification decides
            if attempt == attempts - 1 or not transient(exc):
                raise
            time.sleep(min(max_delay, base_delay * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


