"""Which ids an output already holds: 128-bit id keys and an id-keyed index of content hashes,
read from committed Parquet shards (resume skips them; a store's diff looks ids up in them).

The index keeps 128 bits of each id (two vectorised SipHash words) and 128 bits of its content
hash as four uint64 arrays, sorted by id: 32 bytes a record, no strings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

# SipHash keys (16 bytes each) for the two halves of an id's 128-bit key.
_KEY_HI = "mmembed-idkey-hi"


_KEY_LO = "mmembed-idkey-lo"


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


# -- Ray tasks over Parquet -----------------------------------------------------------------------
def _read_columns(paths: list[str], columns: list[str] | None, storage_options: dict | None) -> pa.Table | None:
    import pyarrow.parquet as pq

    from mmembed.storage.fs import filesystem, with_retries

    tables = []
    for p in paths:
        fs, path = filesystem(p, storage_options)

        def read(fs=fs, path=path):
            with fs.open(path, "rb") as f:
                return pq.read_table(f, columns=columns)

        tables.append(with_retries(read))
    if not tables:
        return None if columns is None else pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables(tables, promote_options="default")
