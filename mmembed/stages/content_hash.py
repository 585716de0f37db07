"""Stage: content hash of each record, for incremental re-embedding.

The hash covers what the model would see: the text and the bytes of every media cell (fetched
when the cell is a URI), plus structured cells (audio arrays, chat messages) in a canonical
JSON form. It does not cover the id or where the bytes live, so moving a file does not count
as a change. A record whose media cannot be fetched gets no hash: it is treated as changed and
the preprocess stage turns it into an error row with the reason.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

from mmembed.inputs.discover import MEDIA_MODALITIES
from mmembed.storage.fetch import Fetcher, FetchError

HASH_SCHEMA = pa.schema([("id", pa.string()), ("content_hash", pa.string())])


class ContentHashStage:
    """CPU actor: records in, (id, content_hash) out; a 128-bit BLAKE2b digest as 32 hex digits."""

    def __init__(
        self,
        *,
        storage_options: dict | None = None,
        max_bytes: int = 256 * 1024 * 1024,
        allow_http: bool = False,
        http_timeout_s: float = 30.0,
        keep_record: bool = False,
    ):
        self.keep_record = keep_record  # records out, + content_hash (what reembed's diff needs)
        self.fetcher = Fetcher(storage_options, max_bytes=max_bytes, allow_http=allow_http, http_timeout_s=http_timeout_s)

    def __call__(self, batch: pa.Table) -> pa.Table:
        hashes = [self.digest(row) for row in batch.to_pylist()]
        if self.keep_record:
            return batch.append_column("content_hash", pa.array(hashes, pa.string()))
        return pa.table({"id": batch.column("id"), "content_hash": pa.array(hashes, pa.string())}, schema=HASH_SCHEMA)

    def digest(self, row: dict) -> str | None:
        h = hashlib.blake2b(digest_size=16)

        def part(name: str, data: bytes) -> None:
            # Length-prefixed, so that ("ab", "c") and ("a", "bc") never collide.
            h.update(f"{name}:{len(data)}:".encode())
            h.update(data)

        try:
            if row.get("text") is not None:
                part("text", row["text"].encode("utf-8"))
            elif row.get("text_uri") is not None:
                part("text", self.fetcher.fetch(row["text_uri"]))
            for m in MEDIA_MODALITIES:
                if row.get(f"{m}_bytes") is not None:
                    part(m, row[f"{m}_bytes"])
                elif row.get(f"{m}_uri") is not None:
                    part(m, self.fetcher.fetch(row[f"{m}_uri"]))
                elif row.get(f"{m}_struct") is not None:
                    part(m, _canonical(row[f"{m}_struct"]))
            if row.get("messages") is not None:
                part("messages", _canonical(row["messages"]))
        except FetchError:
            return None
        return h.hexdigest()


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_bytes_default).encode()


def _bytes_default(value):
    if isinstance(value, (bytes, bytearray)):
        return hashlib.blake2b(value, digest_size=16).hexdigest()
    return str(value)
