"""Stage 1 of the rerank job: candidates in, (query, document) pair records out.

A candidate row names a query and a document: `query_id`, `query`, `doc_id`, `doc`. Each cell
holds text, a media URI or path, raw bytes or a struct of modalities (`{text, image, ...}`).
This stage maps both sides onto the embedding job's record columns, prefixed `query_` and
`doc_` (so `query_id` and `doc_id` are the sides' ids), which lets the CPU pool reuse the
embedding pipeline's fetch, decode and record handling unchanged.

A side that the candidates do not carry is resolved by id from a manifest in the embedding
job's input format (`--corpus` for documents, `--queries` for queries). That lookup is a
streaming hash join done with Ray Data's groupby on the id, so neither the corpus nor the
candidates ever gather on one node; an id the manifest lacks becomes an error row later.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmembed.records import MEDIA_MODALITIES, RECORD_SCHEMA, InputError, InputSpec, modality_of_extension
from mmembed.stages.read import normalize_manifest_table
from mmembed.storage import filesystem, is_absolute_uri, unstrip

SIDES = {"query": "query_id", "doc": "doc_id"}
# Columns that say whether a resolved side was found in its manifest (null: not found).
FOUND = {side: f"{side}_found" for side in SIDES}


def side_columns(side: str) -> list[str]:
    return [f"{side}_{name}" for name in RECORD_SCHEMA.names]


def pair_schema() -> pa.Schema:
    fields = [pa.field("id", pa.string())]
    for side in SIDES:
        fields += [pa.field(f"{side}_{f.name}", f.type) for f in RECORD_SCHEMA]
        fields.append(pa.field(FOUND[side], pa.bool_()))
    return pa.schema(fields)


PAIR_SCHEMA = pair_schema()


def pair_id(query_id, doc_id) -> str:
    """The id of a pair in error rows: a JSON [query_id, doc_id], unambiguous whatever the ids hold."""
    return json.dumps([query_id, doc_id], ensure_ascii=False)


def split_pair_id(value: str) -> tuple:
    query_id, doc_id = json.loads(value)
    return query_id, doc_id


def is_media_reference(value: str) -> bool:
    """A string cell names a media object when it ends in a media extension and reads as a path.

    Free text that merely ends in ".jpg" has spaces or line breaks; a path with spaces must be
    absolute (or a URI) to count as one.
    """
    if "\n" in value or modality_of_extension(value) not in MEDIA_MODALITIES:
        return False
    return is_absolute_uri(value) or " " not in value


def cell_manifest_columns(col: pa.ChunkedArray) -> dict:
    """The embedding-manifest columns (text, image, audio, video) that a candidates cell column means."""
    t = col.type
    if pa.types.is_struct(t):
        flat = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        # A null struct is a null record, not a record of null fields.
        return {t.field(i).name: pc.if_else(flat.is_valid(), flat.field(i), None) for i in range(t.num_fields)}
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return {"image": col.cast(pa.binary())}
    if pa.types.is_null(t):
        return {}
    values = col.cast(pa.string()).to_pylist()
    out = {"text": pa.array([None if v is None or is_media_reference(v) else v for v in values], pa.string())}
    for m in MEDIA_MODALITIES:
        picked = [v if v is not None and is_media_reference(v) and modality_of_extension(v) == m else None for v in values]
        if any(v is not None for v in picked):
            out[m] = pa.array(picked, pa.string())
    return out


def side_table(ids: pa.ChunkedArray, cells: pa.ChunkedArray | None, root: str, side: str) -> dict:
    """One side's prefixed record columns for a candidates batch."""
    n = len(ids)
    if cells is None:
        return {f"{side}_{f.name}": pa.nulls(n, f.type) for f in RECORD_SCHEMA if f.name != "id"}
    table = pa.table({"id": ids.cast(pa.string()), **cell_manifest_columns(cells)})
    if table.num_columns == 1:
        table = table.append_column("text", pa.nulls(n, pa.string()))
    records = normalize_manifest_table(table, root)
    return {f"{side}_{name}": records.column(name) for name in RECORD_SCHEMA.names if name != "id"}


def normalize_candidates(table: pa.Table, root: str, resolved: tuple[str, ...] = ()) -> pa.Table:
    """Map a candidates batch onto PAIR_SCHEMA. Sides in `resolved` are left null for the join."""
    n = table.num_rows
    cols = {}
    ids = {side: table.column(key).cast(pa.string()) for side, key in SIDES.items()}
    cols["id"] = pa.array([pair_id(q, d) for q, d in zip(ids["query"].to_pylist(), ids["doc"].to_pylist())])
    for side, key in SIDES.items():
        cells = None if side in resolved else table.column(side)
        cols[key] = ids[side]
        cols.update(side_table(ids[side], cells, root, side))
        cols[FOUND[side]] = pa.nulls(n, pa.bool_()) if side in resolved else pa.array([True] * n)
    return pa.table(cols).select(PAIR_SCHEMA.names).cast(PAIR_SCHEMA)


def manifest_as_side(records: pa.Table, side: str) -> pa.Table:
    """Embedding-manifest records (RECORD_SCHEMA) as PAIR_SCHEMA rows carrying only `side`."""
    n = records.num_rows
    cols = {f.name: pa.nulls(n, f.type) for f in PAIR_SCHEMA}
    for name in RECORD_SCHEMA.names:
        cols[f"{side}_{name}"] = records.column(name)
    cols[FOUND[side]] = pa.array([True] * n)
    return pa.table(cols, schema=PAIR_SCHEMA)


def attach_side(group: pa.Table, side: str) -> pa.Table:
    """One id's group after the shuffle: copy the manifest record onto every candidate row.

    Manifest rows are the ones without a pair id. A group without one leaves the side null,
    and `FOUND[side]` null tells the preprocess stage the id was missing.
    """
    is_manifest = pc.is_null(group.column("id"))
    pairs = group.filter(pc.invert(is_manifest))
    if pairs.num_rows == 0:
        return pairs
    source = group.filter(is_manifest)
    if source.num_rows == 0:
        return pairs
    n = pairs.num_rows
    for name in side_columns(side)[1:] + [FOUND[side]]:
        value = source.column(name)[0]
        pairs = pairs.set_column(pairs.schema.get_field_index(name), name, pa.repeat(value, n))
    return pairs


def discover_candidates(uri: str, storage_options: dict | None = None) -> InputSpec:
    """List a candidates dataset (Parquet file, directory or glob) and read its schemas and row counts."""
    fs, path = filesystem(uri, storage_options)
    if any(ch in path for ch in "*?["):
        found = sorted(p for p in fs.glob(path) if not fs.isdir(p))
        root = path.split("*", 1)[0].rsplit("/", 1)[0]
    elif fs.isdir(path):
        found = sorted(p for p in fs.find(path) if not any(s.startswith((".", "_")) for s in p[len(path):].split("/")))
        root = path
    elif fs.exists(path):
        found, root = [path], path.rsplit("/", 1)[0]
    else:
        raise InputError(f"candidates not found: {uri}")
    files = [p for p in found if p.endswith(".parquet")]
    if not files:
        raise InputError(f"no Parquet files in candidates {uri} (found {len(found)} other files)")
    columns: list[str] = []
    rows = 0
    for p in files:
        with fs.open(p, "rb") as f:
            pf = pq.ParquetFile(f)
            rows += pf.metadata.num_rows
            for name in pf.schema_arrow.names:
                if name not in columns:
                    columns.append(name)
    return InputSpec(
        uri=uri,
        kind="candidates",
        paths=[unstrip(fs, p) for p in files],
        root=unstrip(fs, root),
        num_records=rows,
        columns=columns,
    )


def missing_columns(spec: InputSpec, resolved: tuple[str, ...]) -> list[str]:
    needed = [key for key in SIDES.values()] + [side for side in SIDES if side not in resolved]
    return [c for c in needed if c not in spec.columns]


def read_parquet(paths: list[str], uri: str, storage_options: dict | None = None, num_cpus: float = 0.25):
    """A Ray dataset over Parquet files, read through fsspec so any URI scheme works."""
    import ray.data
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = filesystem(uri, storage_options)
    return ray.data.read_parquet(
        [fs._strip_protocol(p) for p in paths],
        filesystem=PyFileSystem(FSSpecHandler(fs)),
        num_cpus=num_cpus,
    )


class ReadPairsStage:
    """Builds the pair stream. Runs on the driver; reads, joins and normalisation run in Ray tasks."""

    def __init__(
        self,
        candidates: InputSpec,
        *,
        manifests: dict[str, InputSpec] | None = None,
        storage_options: dict | None = None,
        num_partitions: int = 2,
        read_cpus: float = 0.25,
    ):
        self.candidates = candidates
        self.manifests = manifests or {}
        self.storage_options = storage_options or {}
        self.num_partitions = num_partitions
        self.read_cpus = read_cpus

    def dataset(self):
        from mmembed.stages.read import ReadStage

        resolved = tuple(self.manifests)
        wanted = list(SIDES.values()) + [s for s in SIDES if s not in resolved]
        ds = read_parquet(self.candidates.paths, self.candidates.uri, self.storage_options, self.read_cpus)
        ds = ds.map_batches(
            lambda t: normalize_candidates(t.select(wanted), self.candidates.root, resolved),
            batch_format="pyarrow",
            num_cpus=self.read_cpus,
        )
        for side, spec in self.manifests.items():
            records = ReadStage(spec, self.storage_options, read_cpus=self.read_cpus).dataset()
            records = records.map_batches(
                lambda t, side=side: manifest_as_side(t.select(RECORD_SCHEMA.names), side),
                batch_format="pyarrow",
                num_cpus=self.read_cpus,
            )
            ds = (
                ds.union(records)
                .groupby(SIDES[side], num_partitions=self.num_partitions)
                .map_groups(attach_side, fn_kwargs={"side": side}, batch_format="pyarrow", num_cpus=self.read_cpus)
            )
        return ds
