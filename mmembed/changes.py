"""Which records changed since a snapshot: an id-keyed index of content hashes, and the
per-batch steps of an incremental run that use it.

The index keeps 128 bits of each id (two vectorised SipHash words) and 128 bits of its content
hash as four uint64 arrays, sorted by id: 32 bytes a record, no strings. It is built by a Ray
task, lives in the object store, and every worker maps it zero-copy, so neither the driver nor
any worker holds the corpus' ids as Python objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# SipHash keys (16 bytes each) for the two halves of an id's 128-bit key.
_KEY_HI = "mmembed-idkey-hi"
_KEY_LO = "mmembed-idkey-lo"

NEW, CHANGED, UNCHANGED = "new", "changed", "unchanged"
CHANGES_SCHEMA = pa.schema([("id", pa.string()), ("content_hash", pa.string()), ("status", pa.string())])


def id_keys(ids) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    values = np.asarray(ids.to_pylist() if hasattr(ids, "to_pylist") else ids, dtype=object)
    return (
        pd.util.hash_array(values, hash_key=_KEY_HI, categorize=False),
        pd.util.hash_array(values, hash_key=_KEY_LO, categorize=False),
    )


def hash_words(hashes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """32-hex-digit content hashes -> (hi, lo, valid); a null hash is never equal to anything."""
    values = hashes.to_pylist() if hasattr(hashes, "to_pylist") else list(hashes)
    n = len(values)
    hi, lo, ok = np.zeros(n, np.uint64), np.zeros(n, np.uint64), np.zeros(n, bool)
    for i, h in enumerate(values):
        if h:
            hi[i], lo[i], ok[i] = int(h[:16], 16), int(h[16:32], 16), True
    return hi, lo, ok


def words_to_hex(hi: np.ndarray, lo: np.ndarray, ok: np.ndarray) -> pa.Array:
    return pa.array([f"{a:016x}{b:016x}" if v else None for a, b, v in zip(hi.tolist(), lo.tolist(), ok)], pa.string())


@dataclass
class KeyIndex:
    """Sorted (id key -> content hash) arrays with vectorised lookup."""

    khi: np.ndarray
    klo: np.ndarray
    vhi: np.ndarray
    vlo: np.ndarray
    vok: np.ndarray

    @classmethod
    def build(cls, ids, hashes) -> "KeyIndex":
        khi, klo = id_keys(ids)
        vhi, vlo, vok = hash_words(hashes)
        order = np.lexsort((klo, khi))
        return cls(khi[order], klo[order], vhi[order], vlo[order], vok[order])

    @classmethod
    def empty(cls) -> "KeyIndex":
        z = np.zeros(0, np.uint64)
        return cls(z, z, z, z, np.zeros(0, bool))

    def __len__(self) -> int:
        return len(self.khi)

    def lookup(self, ids) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(found, hash hi, hash lo, hash valid) for each id."""
        qhi, qlo = id_keys(ids)
        n = len(qhi)
        found = np.zeros(n, bool)
        pos = np.zeros(n, np.int64)
        if len(self.khi) and n:
            start = np.searchsorted(self.khi, qhi, side="left")
            end = np.searchsorted(self.khi, qhi, side="right")
            single = (end - start) == 1
            hit = single & (self.klo[np.minimum(start, len(self.klo) - 1)] == qlo)
            found[hit], pos[hit] = True, start[hit]
            # Several ids sharing a high word are rare (a 64-bit collision): search their low words.
            for i in np.nonzero((end - start) > 1)[0]:
                j = start[i] + np.searchsorted(self.klo[start[i] : end[i]], qlo[i])
                if j < end[i] and self.klo[j] == qlo[i]:
                    found[i], pos[i] = True, j
        vhi = np.where(found, self.vhi[pos] if len(self.vhi) else 0, 0).astype(np.uint64)
        vlo = np.where(found, self.vlo[pos] if len(self.vlo) else 0, 0).astype(np.uint64)
        vok = found & (self.vok[pos] if len(self.vok) else False)
        return found, vhi, vlo, vok


class IndexRef:
    """A picklable handle on a KeyIndex in the object store, fetched once per worker process."""

    _cache: dict = {}

    def __init__(self, ref):
        self.ref = ref

    def get(self) -> KeyIndex:
        import ray

        key = self.ref.hex()
        if key not in IndexRef._cache:
            IndexRef._cache.clear()  # one run's indexes at a time per worker
            IndexRef._cache[key] = ray.get(self.ref)
        return IndexRef._cache[key]


# -- Ray tasks that build indexes from Parquet ----------------------------------------------------
def _read_columns(paths: list[str], columns: list[str], storage_options: dict | None) -> pa.Table:
    import pyarrow.parquet as pq

    from mmembed.storage import filesystem

    tables = []
    for p in paths:
        fs, path = filesystem(p, storage_options)
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables(tables, promote_options="default")


def build_index(paths: list[str], error_paths: list[str] = (), storage_options: dict | None = None) -> KeyIndex:
    """Index of (id, content_hash) from a snapshot's result shards and error shards.

    Error rows enter without a hash, so a record the base could not embed counts as changed and
    is tried again, and the base's ids are all known when counting deletions.
    """
    t = _read_columns(paths, ["id", "content_hash"], storage_options)
    errors = _read_columns(list(error_paths), ["id"], storage_options)
    ids = pa.concat_arrays([c.combine_chunks() for c in (t.column("id"), errors.column("id").cast(pa.string()))])
    hashes = pa.concat_arrays(
        [t.column("content_hash").combine_chunks().cast(pa.string()), pa.nulls(errors.num_rows, pa.string())]
    )
    return KeyIndex.build(ids, hashes) if len(ids) else KeyIndex.empty()


def build_change_sets(paths: list[str], storage_options: dict | None = None):
    """From a run's `_changes` shards: (records to embed, records to carry over, counts)."""
    t = _read_columns(paths, ["id", "content_hash", "status"], storage_options)
    status = t.column("status")
    unchanged = pc.equal(status, UNCHANGED)
    todo, keep = t.filter(pc.invert(unchanged)), t.filter(unchanged)
    counts = {s: int(pc.sum(pc.equal(status, s)).as_py() or 0) for s in (NEW, CHANGED, UNCHANGED)}
    return (
        KeyIndex.build(todo.column("id"), todo.column("content_hash")),
        KeyIndex.build(keep.column("id"), keep.column("content_hash")),
        counts,
    )


# -- Per-batch steps ------------------------------------------------------------------------------
def classify(batch: pa.Table, base: IndexRef | None) -> pa.Table:
    """(id, content_hash) -> + status: new (not in the base), changed (other content, or the base
    has an error row for it), or unchanged."""
    if base is None:
        status = pa.array([NEW] * batch.num_rows, pa.string())
    else:
        found, vhi, vlo, vok = base.get().lookup(batch.column("id"))
        chi, clo, cok = hash_words(batch.column("content_hash"))
        same = found & vok & cok & (vhi == chi) & (vlo == clo)
        status = pa.array(np.where(~found, NEW, np.where(same, UNCHANGED, CHANGED)).tolist(), pa.string())
    return pa.table(
        {"id": batch.column("id"), "content_hash": batch.column("content_hash"), "status": status},
        schema=CHANGES_SCHEMA,
    )


class InIndex:
    """Row predicate for Ray Data `filter`: the record's id is in the index (to be embedded)."""

    def __init__(self, index: IndexRef):
        self.index = index

    def __call__(self, row: dict) -> bool:
        return bool(self.index.get().lookup([row["id"]])[0][0])


def attach_hashes(batch: pa.Table, index: IndexRef, schema: pa.Schema) -> pa.Table:
    """Give embedded (and error) rows the content hash the change pass computed for them."""
    _, vhi, vlo, vok = index.get().lookup(batch.column("id"))
    batch = batch.append_column("content_hash", words_to_hex(vhi, vlo, vok))
    return batch.select(schema.names).cast(schema)


def carry_over(batch: pa.Table, keep: IndexRef, schema: pa.Schema) -> pa.Table:
    """Rows of the base snapshot whose record is still in the input with the same content."""
    found, vhi, vlo, vok = keep.get().lookup(batch.column("id"))
    chi, clo, cok = hash_words(batch.column("content_hash"))
    batch = batch.filter(pa.array(found & vok & cok & (vhi == chi) & (vlo == clo)))
    n = batch.num_rows
    batch = batch.append_column("stage", pa.nulls(n, pa.string())).append_column("error", pa.nulls(n, pa.string()))
    return batch.select(schema.names).cast(schema)
