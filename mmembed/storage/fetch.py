"""One record's media bytes from any URI in one request, with the limits and retries that turn
failures into error rows.

- Local files: one read of at most --max-bytes + 1 bytes.
- Object stores (s3://, gs://, ...): one ranged GET through fsspec's `cat_file` (bytes 0 to
  --max-bytes), not `open()`, which sends a HEAD before its GET.
- http(s)://: one streamed GET (the standard library's client, which follows redirects and decodes
  chunked bodies), read in a loop to the end or past the limit. fsspec's HTTP file is not used: it
  sends a HEAD first and returns a chunked body cut short without an error.

A body is complete only when the connection says so: a chunked body that ends without its last
chunk, or fewer bytes than Content-Length, is truncated, retried, then an error row naming the URL
and the bytes received. A body over --max-bytes is refused whether or not the server declared its
size. --http-timeout bounds each try (connecting, then every byte of the body); a fetch makes at
most `attempts` tries.
"""

from __future__ import annotations

import http.client
import socket
import time
import urllib.error
import urllib.request
from typing import Any

from mmembed.storage.fs import FetchError, filesystem, is_transient, protocol_of, with_retries

HTTP_PROTOCOLS = ("http", "https")
MAX_REDIRECTS = 10
CHUNK = 1 << 16
# Served where media were expected: a login page, an error page, a JSON API answer.
NOT_MEDIA = ("text/", "application/xhtml+xml", "application/json", "application/xml")


class Truncated(ConnectionError):
    """A body that ended before the connection said it was complete (retried: it is transient)."""

    def __init__(self, received: int, expected: int | None):
        self.received, self.expected = received, expected
        of = f" of {expected:,}" if expected is not None else ""
        super().__init__(f"truncated body: received {received:,}{of} bytes")


class _Transient(ConnectionError):
    """A server error (5xx, 429): retried."""


class _Refused(Exception):
    """An answer no retry changes: becomes a FetchError as it is."""


class _Redirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, but a loop and a chain that is too long say which they are."""

    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        visited = getattr(req, "redirect_dict", {})
        if newurl in visited or newurl == req.full_url:
            raise _Refused(f"redirect loop ({code} back to {newurl})")
        if len(visited) >= MAX_REDIRECTS:
            raise _Refused(f"too many redirects (more than {MAX_REDIRECTS})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class Fetcher:
    """Fetches media bytes for the CPU stages, with limits that turn into error rows."""

    def __init__(
        self,
        storage_options: dict | None = None,
        *,
        max_bytes: int = 256 * 1024 * 1024,
        allow_http: bool = False,
        http_timeout_s: float = 30.0,
        attempts: int = 5,
    ):
        self.storage_options = storage_options or {}
        self.max_bytes = max_bytes
        self.allow_http = allow_http
        self.http_timeout_s = http_timeout_s
        self.attempts = attempts
        self._fs_cache: dict[str, tuple[Any, str]] = {}
        # No proxy handler: the environment's proxies still apply through urllib's defaults.
        self._http = urllib.request.build_opener(_Redirects)

    def _fs(self, uri: str):
        protocol = protocol_of(uri)
        if protocol not in self._fs_cache:
            self._fs_cache[protocol] = filesystem(uri, self.storage_options)[0]
        return self._fs_cache[protocol]

    def fetch(self, uri: str) -> bytes:
        protocol = protocol_of(uri)
        if protocol in HTTP_PROTOCOLS:
            if not self.allow_http:
                raise FetchError(f"HTTP(S) media URL refused: {uri} (pass --allow-http to fetch it)")
            read = lambda: self._http_get(uri)  # noqa: E731
        else:
            fs = self._fs(uri)
            path = fs._strip_protocol(uri)
            read = lambda: self._store_get(fs, path, local=protocol in ("file", "local"))  # noqa: E731
        try:
            data = with_retries(read, attempts=self.attempts, transient=_transient)
        except _Refused as exc:
            raise FetchError(f"{exc}: {uri}") from None
        except (Truncated, _Transient) as exc:
            raise FetchError(f"{exc} after {self.attempts} tries: {uri}") from None
        except FileNotFoundError:
            raise FetchError(f"not found: {uri}") from None
        except TimeoutError:
            raise FetchError(f"timed out after {self.attempts} tries of {self.http_timeout_s:g} s: {uri}") from None
        except IsADirectoryError:
            raise FetchError(f"is a directory, not a file: {uri}") from None
        except PermissionError as exc:
            raise FetchError(f"permission denied: {uri} ({exc})") from None
        except ConnectionError as exc:
            raise FetchError(f"connection failed after {self.attempts} tries ({exc}): {uri}") from None
        if len(data) > self.max_bytes:
            raise FetchError(self._over_limit(uri))
        if not data:
            raise FetchError(f"zero-byte object: {uri}")
        return data

    def _over_limit(self, uri: str, detail: str = "") -> str:
        return f"object larger than the {self.max_bytes}-byte limit (--max-bytes{detail}): {uri}"

    # -- object stores and local files ----------------------------------------------------------
    def _store_get(self, fs, path: str, *, local: bool) -> bytes:
        if local:
            with fs.open(path, "rb") as f:
                return f.read(self.max_bytes + 1)
        try:
            # One GET of bytes 0..max_bytes: an object larger than the limit shows as one byte over it.
            return fs.cat_file(path, start=0, end=self.max_bytes + 1)
        except OSError as exc:
            # A range on an empty object is unsatisfiable (416 InvalidRange): the object is empty.
            if any(w in f"{exc} {exc.__cause__}" for w in ("InvalidRange", "not satisfiable", "416")):
                return b""
            raise

    # -- http(s) ----------------------------------------------------------------------------------
    def _http_get(self, uri: str) -> bytes:
        deadline = time.monotonic() + self.http_timeout_s
        request = urllib.request.Request(uri, headers={"User-Agent": "mmembed", "Accept": "*/*"})
        try:
            response = self._http.open(request, timeout=self.http_timeout_s)
        except urllib.error.HTTPError as exc:
            exc.close()
            reason = f"HTTP {exc.code} {exc.reason}".rstrip()
            if exc.code >= 500 or exc.code == 429:
                raise _Transient(reason) from None
            if exc.code in (404, 410):
                raise _Refused(f"not found ({reason})") from None
            raise _Refused(reason) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise TimeoutError(str(exc.reason)) from None
            raise ConnectionError(f"{type(exc.reason).__name__}: {exc.reason}") from None
        with response:
            kind = response.headers.get_content_type() if response.headers.get("Content-Type") else None
            if kind and kind.startswith(NOT_MEDIA):
                raise _Refused(f"not media: served as {kind}")
            declared = response.headers.get("Content-Length")
            expected = int(declared) if declared and declared.isdigit() else None
            if expected is not None and expected > self.max_bytes:
                raise FetchError(self._over_limit(uri, f"; Content-Length {expected:,}"))
            parts, received = [], 0
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"body not complete within {self.http_timeout_s:g} s")
                _set_timeout(response, left)
                try:
                    chunk = response.read1(CHUNK) if hasattr(response, "read1") else response.read(CHUNK)
                except http.client.IncompleteRead as exc:
                    raise Truncated(received + len(exc.partial), expected) from None
                except (TimeoutError, socket.timeout):
                    raise TimeoutError(f"body not complete within {self.http_timeout_s:g} s") from None
                if not chunk:
                    break
                parts.append(chunk)
                received += len(chunk)
                if received > self.max_bytes:
                    raise FetchError(self._over_limit(uri))
            if expected is not None and received < expected:
                raise Truncated(received, expected)
            return b"".join(parts)


def _set_timeout(response, seconds: float) -> None:
    """The socket's timeout for the next read: what is left of the try, so a slow drip cannot outlast it."""
    try:
        response.fp.raw._sock.settimeout(max(0.01, seconds))
    except AttributeError:  # not a plain socket underneath: the timeout given to open() stays
        pass


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, _Refused):
        return False
    return isinstance(exc, (Truncated, _Transient, TimeoutError, ConnectionError)) or is_transient(exc)
