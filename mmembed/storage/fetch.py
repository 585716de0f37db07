"""One record's media bytes from any URI, with the limits and retries that turn failures into error rows."""

from __future__ import annotations

from typing import Any

import fsspec

from mmembed.storage.fs import FetchError, filesystem, is_transient, protocol_of, with_retries

HTTP_PROTOCOLS = ("http", "https")


class Fetcher:
    """Fetches media bytes for the preprocess stage, with limits that turn into error rows."""

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

    def _fs(self, uri: str):
        protocol = protocol_of(uri)
        if protocol not in self._fs_cache:
            if protocol in HTTP_PROTOCOLS:
                import aiohttp

                fs = fsspec.filesystem(
                    protocol, client_kwargs={"timeout": aiohttp.ClientTimeout(total=self.http_timeout_s)}
                )
            else:
                fs, _ = filesystem(uri, self.storage_options)
            self._fs_cache[protocol] = fs
        return self._fs_cache[protocol]

    def fetch(self, uri: str) -> bytes:
        protocol = protocol_of(uri)
        if protocol in HTTP_PROTOCOLS and not self.allow_http:
            raise FetchError(f"HTTP(S) media URL refused: {uri} (pass --allow-http to fetch it)")
        fs = self._fs(uri)
        path = uri if protocol in HTTP_PROTOCOLS else fs._strip_protocol(uri)

        def read() -> bytes:
            try:
                with fs.open(path, "rb") as f:
                    return f.read(self.max_bytes + 1)
            except FileNotFoundError as exc:
                # fsspec's HTTP filesystem reports any failed probe (a timeout, a 503) as "not found".
                if exc.__cause__ is not None and is_transient(exc.__cause__):
                    raise exc.__cause__ from None
                raise

        try:
            data = with_retries(read, attempts=self.attempts)
        except FileNotFoundError:
            raise FetchError(f"not found: {uri}") from None
        except TimeoutError:
            raise FetchError(f"timed out ({self.attempts} tries): {uri}") from None
        except IsADirectoryError:
            raise FetchError(f"is a directory, not a file: {uri}") from None
        except PermissionError as exc:
            raise FetchError(f"permission denied: {uri} ({exc})") from None
        if len(data) > self.max_bytes:
            raise FetchError(f"object larger than the {self.max_bytes}-byte limit (--max-bytes): {uri}")
        if not data:
            raise FetchError(f"zero-byte object: {uri}")
        return data
