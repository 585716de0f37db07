"""WebDataset tar shards (img2dataset's `webdataset` output): records streamed out of each shard.

A record is the run of members that share a key (`000123.jpg`, `000123.txt`, `000123.json`);
the extension says the modality, and json/cls members are metadata, not embedded. Its id is
`<shard path>/<key>`, the shard path relative to the input's root as media ids are. A shard is
read as a stream of bytes and nothing is decoded here (the CPU pool decodes): the object store
holds compressed bytes, not pixel arrays. A truncated or corrupt shard keeps the records read
before the fault and adds one error row, whose id is the shard's, naming the byte offset.
"""

from __future__ import annotations

import re
import tarfile
import zlib
from typing import Iterator

import pyarrow as pa

from mmembed.schema import CELL_ERROR, DEFAULT_COLUMNS, RECORD_SCHEMA, Columns
from mmembed.storage.fs import filesystem

TAR_SUFFIX = ".tar"
EXTENSIONS = {
    **{ext: "image" for ext in ("jpg", "jpeg", "png", "webp")},
    "txt": "text",
    **{ext: "audio" for ext in ("wav", "flac", "mp3", "ogg")},
    **{ext: "video" for ext in ("mp4", "webm", "mov")},
}
METADATA = ("json", "cls")
_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`shards-{000000..000009}.tar` and `{a,b}` as WebDataset and img2dataset write them."""
    m = _BRACES.search(pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    if ".." in body:
        lo, hi = body.split("..", 1)
        if not (lo.isdigit() and hi.isdigit()):
            raise ValueError(f"brace range {{{body}}} is not numeric")
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [p for item in items for p in expand_braces(head + item + tail)]


def split_member(name: str) -> tuple[str, str]:
    """(key, extension) of a member: the key is everything before the first dot of its base name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _record(rid: str, cells: dict, keeps) -> dict:
    row = {"id": rid}
    for modality, value in cells.items():
        if not keeps(modality):
            continue
        if modality == "text":
            try:
                row["text"] = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                row[CELL_ERROR] = f"txt member is not UTF-8 text ({exc})"
        else:
            row[f"{modality}_bytes"] = value
    return row


def _table(rows: list[dict]) -> pa.Table:
    return pa.table({f.name: pa.array([r.get(f.name) for r in rows], f.type) for f in RECORD_SCHEMA})


def read_shard(uri: str, shard_id: str, storage_options: dict | None = None, *, mapping: Columns = DEFAULT_COLUMNS,
               block_rows: int = 256) -> Iterator[pa.Table]:
    """The records of one shard, `block_rows` at a time, in RECORD_SCHEMA."""
    fs, path = filesystem(uri, storage_options)
    rows: list[dict] = []
    key, cells, done, tar, fault = None, {}, 0, None, None
    with fs.open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r|*")
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = split_member(member.name)
                if k != key:
                    if key is not None:
                        rows.append(_record(f"{shard_id}/{key}", cells, mapping.keeps))
                        done += 1
                    key, cells = k, {}
                modality = EXTENSIONS.get(ext.rsplit(".", 1)[-1])
                if modality is not None:
                    cells[modality] = tar.extractfile(member).read()
                if len(rows) >= block_rows:
                    yield _table(rows)
                    rows = []
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            fault = exc
        offset = tar.offset if tar is not None else 0
    if fault is None and key is not None:
        rows.append(_record(f"{shard_id}/{key}", cells, mapping.keeps))
    elif fault is not None:
        lost = f"; the record being read there ({shard_id}/{key}) is not embedded" if key is not None else ""
        rows.append({"id": shard_id, CELL_ERROR: f"WebDataset shard {shard_id} is truncated or corrupt at byte "
                                                  f"offset {offset}, after {done} records: {type(fault).__name__}: "
                                                  f"{fault}{lost}"})
    if rows:
        yield _table(rows)


def read_shards(batch: pa.Table, storage_options: dict | None, mapping: Columns, block_rows: int) -> Iterator[pa.Table]:
    """Ray read task: a batch of (uri, shard) rows in, the shards' records out, streamed."""
    for uri, shard_id in zip(batch.column("uri").to_pylist(), batch.column("shard").to_pylist()):
        yield from read_shard(uri, shard_id, storage_options, mapping=mapping, block_rows=block_rows)


def sample_shard(uri: str, fs, mapping: Columns, members: int = 200) -> tuple[set[str], int, int]:
    """(modality labels such as `image+text`, records, bytes) of the first records of a shard, read on
    the driver before anything runs: what the records hold, and roughly how many a byte of shard holds."""
    groups: dict[str, set] = {}
    nbytes = 0
    try:
        with fs.open(fs._strip_protocol(uri), "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for i, member in enumerate(tar):
                if i >= members:
                    break
                nbytes = tar.offset
                if member.isfile():
                    k, ext = split_member(member.name)
                    modality = EXTENSIONS.get(ext.rsplit(".", 1)[-1])
                    kept = {modality} if modality is not None and mapping.keeps(modality) else set()
                    groups.setdefault(k, set()).update(kept)
            else:
                nbytes = tar.offset
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        pass  # a bad shard becomes its error row when it is read
    return {"+".join(sorted(g)) for g in groups.values() if g}, len(groups), nbytes
