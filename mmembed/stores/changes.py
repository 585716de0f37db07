"""Which records changed since a snapshot: a diff of (id, content hash) streamed through hash
buckets, and an id-keyed index of content hashes for looking ids up.

The index keeps 128 bits of each id (two vectorised SipHash words) and 128 bits of its content
hash as four uint64 arrays, sorted by id: 32 bytes a record, no strings.

The diff never holds every id anywhere. Both sides (the input's records with their new hashes,
the base snapshot's rows) are written to scratch Parquet split by a hash of the id into buckets of
about BUCKET_ROWS records (a streaming Ray Data write), then one Ray task per bucket diffs that
bucket alone: it indexes the base's ids of the bucket, classifies the bucket's records, and writes
the bucket's `_changes` rows, its records to embed (with their hash) and its base rows to carry
over. Memory per task is one bucket; the driver only sees per-bucket counts.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmembed.outputs.ids import IndexRef, KeyIndex, _read_columns, hash_words, id_keys

NEW, CHANGED, UNCHANGED = "new", "changed", "unchanged"
CHANGES_SCHEMA = pa.schema([("id", pa.string()), ("content_hash", pa.string()), ("status", pa.string())])


# -- the bucketed diff ----------------------------------------------------------------------------
BUCKET_ROWS = 200_000
BUCKET = "bucket"


def num_buckets(rows: int) -> int:
    return max(1, min(4096, -(-rows // BUCKET_ROWS)))


def add_bucket(batch: pa.Table, buckets: int) -> pa.Table:
    """+ the id's bucket, the column a partitioned write splits the rows by."""
    hi, _ = id_keys(batch.column("id"))
    return batch.append_column(BUCKET, pa.array((hi % np.uint64(buckets)).astype(np.int32)))


def bucket_files(fs, root: str, k: int) -> list[str]:
    """URIs of bucket k's files under a partitioned write's root (none when the bucket is empty)."""
    from mmembed.storage.fs import unstrip, with_retries

    path = f"{fs._strip_protocol(root).rstrip('/')}/{BUCKET}={k}"
    fs.invalidate_cache(path)
    try:
        return sorted(unstrip(fs, f) for f in with_retries(lambda: fs.find(path)) if f.endswith(".parquet"))
    except FileNotFoundError:
        return []


def diff_bucket(k: int, scratch: str, changes: str, schema: pa.Schema, storage_options: dict | None) -> dict:
    """Diff one bucket (a Ray task): write `changes/part-k`, `scratch/todo/part-k` (records to
    embed, with their content_hash) and `scratch/carry/part-k` (base rows kept, in `schema`);
    return its counts."""
    import pyarrow.parquet as pq

    from mmembed.storage.fs import filesystem, join_uri, with_retries

    fs, _ = filesystem(scratch, storage_options)
    new = _read_columns(bucket_files(fs, join_uri(scratch, "new"), k), None, storage_options)
    base_files = bucket_files(fs, join_uri(scratch, "base"), k)
    base = _read_columns(base_files, ["id", "content_hash"], storage_options)
    errors = _read_columns(bucket_files(fs, join_uri(scratch, "base_errors"), k), ["id"], storage_options)
    # Error rows enter without a hash, so a record the base could not embed counts as changed.
    ids = pa.concat_arrays([c.combine_chunks().cast(pa.string()) for c in (base.column("id"), errors.column("id"))])
    hashes = pa.concat_arrays(
        [base.column("content_hash").combine_chunks().cast(pa.string()), pa.nulls(errors.num_rows, pa.string())]
    )
    index = KeyIndex.build(ids, hashes) if len(ids) else KeyIndex.empty()
    counts = {NEW: 0, CHANGED: 0, UNCHANGED: 0}
    if new is None or not new.num_rows:
        return counts
    status = classify(new.select(["id", "content_hash"]), index)
    for s_, n in zip(*(c.to_pylist() for c in pc.value_counts(status.column("status")).flatten())):
        counts[s_] = n

    def write(table: pa.Table, uri: str) -> None:
        wfs, path = filesystem(uri, storage_options)
        wfs.makedirs(wfs._parent(path), exist_ok=True)

        def put():
            with wfs.open(path, "wb") as f:
                pq.write_table(table, f)

        with_retries(put)

    name = f"part-{k:05d}.parquet"
    write(status, join_uri(changes, name))
    unchanged = pc.equal(status.column("status"), UNCHANGED)
    if counts[NEW] + counts[CHANGED]:
        write(new.filter(pc.invert(unchanged)), join_uri(join_uri(scratch, "todo"), name))
    if counts[UNCHANGED]:
        kept = status.filter(unchanged)
        keep = KeyIndex.build(kept.column("id"), kept.column("content_hash"))
        # The base's rows carry embeddings: streamed file by file, never the whole bucket at once.
        carry = []
        for uri in base_files:
            t = _read_columns([uri], ["id", "modality", "embedding", "content_hash"], storage_options)
            carry.append(_kept_rows(t, keep, schema))
        write(pa.concat_tables(carry) if carry else schema.empty_table(), join_uri(join_uri(scratch, "carry"), name))
    return counts


def _kept_rows(batch: pa.Table, keep: KeyIndex, schema: pa.Schema) -> pa.Table:
    """Rows of the base snapshot whose record is still in the input with the same content."""
    found, vhi, vlo, vok = keep.lookup(batch.column("id"))
    chi, clo, cok = hash_words(batch.column("content_hash"))
    batch = batch.filter(pa.array(found & vok & cok & (vhi == chi) & (vlo == clo)))
    n = batch.num_rows
    batch = batch.append_column("stage", pa.nulls(n, pa.string())).append_column("error", pa.nulls(n, pa.string()))
    return batch.select(schema.names).cast(schema)


# -- Per-batch steps ------------------------------------------------------------------------------
def classify(batch: pa.Table, base: "IndexRef | KeyIndex | None") -> pa.Table:
    """(id, content_hash) -> + status: new (not in the base), changed (other content, or the base
    has an error row for it), or unchanged."""
    if base is None:
        status = pa.array([NEW] * batch.num_rows, pa.string())
    else:
        index = base.get() if isinstance(base, IndexRef) else base
        found, vhi, vlo, vok = index.lookup(batch.column("id"))
        chi, clo, cok = hash_words(batch.column("content_hash"))
        same = found & vok & cok & (vhi == chi) & (vlo == clo)
        status = pa.array(np.where(~found, NEW, np.where(same, UNCHANGED, CHANGED)).tolist(), pa.string())
    return pa.table(
        {"id": batch.column("id"), "content_hash": batch.column("content_hash"), "status": status},
        schema=CHANGES_SCHEMA,
    )
