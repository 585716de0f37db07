"""Stage 1 of the rerank job: candidates in, (query, document) pair records out.

A candidate row names a query and a document: `query_id`, `query`, `doc_id`, `doc`. Each cell
holds text, a media URI or path, raw bytes or a struct of modalities (`{text, image, ...}`).
This stage maps both sides onto the embedding job's record columns, prefixed `query_` and
`doc_` (so `query_id` and `doc_id` are the sides' ids), which lets the CPU pool reuse the
embedding pipeline's fetch, decode and record handling unchanged.

A row may instead carry a `messages` cell: the whole pair as one chat conversation (roles
`query` and `document`, as ST maps a pair), which is how `CrossEncoder.predict` takes chat
messages; ST has no form for messages as one side of a pair.

A side that the candidates do not carry is resolved by id from a manifest in the embedding
job's input format (`--corpus` for documents, `--queries` for queries). That lookup is a
streaming hash join done with Ray Data's groupby on the id, so neither the corpus nor the
candidates ever gather on one node; an id the manifest lacks becomes an error row later.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmembed.inputs.discover import (
    MEDIA_MODALITIES,
    MESSAGE_COLUMN,
    RECORD_SCHEMA,
    InputError,
    InputSpec,
    modality_of_extension,
    record_modality,
)
from mmembed.schema import groups_by
from mmembed.stages.read import normalize_manifest_table
from mmembed.storage.fs import filesystem, is_absolute_uri, unstrip

SIDES = {"query": "query_id", "doc": "doc_id"}
# Columns that say whether a resolved side was found in its manifest (null: not found).
FOUND = {side: f"{side}_found" for side in SIDES}


# One Arrow type for every {array, sampling_rate} audio cell, whatever the input used, so that
# blocks from different files and the --corpus join share one schema: [channels, samples].
AUDIO_STRUCT = pa.struct([("array", pa.list_(pa.list_(pa.float32()))), ("sampling_rate", pa.int64())])
# A side's columns: an embedding record, its audio struct, and whether the record was a
# `messages` record (looked up in a manifest), which cannot be one side of a pair.
SIDE_FIELDS = [*RECORD_SCHEMA, pa.field("audio_struct", AUDIO_STRUCT), pa.field("has_messages", pa.bool_())]


def side_columns(side: str) -> list[str]:
    return [f"{side}_{f.name}" for f in SIDE_FIELDS]


def pair_schema(messages_type: pa.DataType | None = None) -> pa.Schema:
    """The pair rows' schema; with the candidates' `messages` type when they carry conversations."""
    fields = [pa.field("id", pa.string())]
    for side in SIDES:
        fields += [pa.field(f"{side}_{f.name}", f.type) for f in SIDE_FIELDS]
        fields.append(pa.field(FOUND[side], pa.bool_()))
    if messages_type is not None:
        fields.append(pa.field(MESSAGE_COLUMN, messages_type))
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


def is_audio_struct(t: pa.DataType) -> bool:
    return pa.types.is_struct(t) and {"array", "sampling_rate"} <= {t.field(i).name for i in range(t.num_fields)}


def canonical_audio_structs(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """{array, sampling_rate} cells as AUDIO_STRUCT; a 1-D array becomes one channel."""
    flat = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not is_audio_struct(flat.type):
        raise InputError(f'audio struct cells need {{"array": [...], "sampling_rate": int}}; got {flat.type}')
    array, rate = pc.struct_field(flat, "array"), pc.struct_field(flat, "sampling_rate")
    inner = array.type.value_type if pa.types.is_list(array.type) or pa.types.is_large_list(array.type) else None
    try:
        if inner is not None and (pa.types.is_list(inner) or pa.types.is_large_list(inner)):
            array = array.cast(AUDIO_STRUCT.field("array").type)
        elif inner is not None:
            offsets = pa.array(np.arange(len(array) + 1, dtype=np.int32))
            array = pa.ListArray.from_arrays(offsets, array.cast(pa.list_(pa.float32())), mask=array.is_null())
        else:
            raise InputError(f"audio struct `array` must be a list of samples (or of channels); got {array.type}")
        rate = rate.cast(pa.int64())
    except pa.ArrowException as exc:
        raise InputError(f"audio struct cells of type {flat.type} cannot be read as samples: {exc}") from None
    return pa.StructArray.from_arrays([array, rate], fields=list(AUDIO_STRUCT), mask=pc.invert(flat.is_valid()))


def cell_manifest_columns(col: pa.ChunkedArray) -> dict:
    """The embedding-manifest columns (text, image, audio, video) that a candidates cell column means."""
    t = col.type
    if is_audio_struct(t):
        return {"audio": col}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        raise InputError(
            "a query/doc cell holds a list (chat messages?), but CrossEncoder takes chat messages only as a whole "
            "pair: put each pair's conversation (roles `query` and `document`) in a `messages` column instead"
        )
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


def side_record_columns(records: pa.Table, side: str) -> dict:
    """Normalised embedding records (RECORD_SCHEMA and its extra columns) as one side's columns."""
    n = records.num_rows
    names = records.column_names
    for m in ("image", "video"):
        if f"{m}_struct" in names:
            raise InputError(f"{m} cells must be URIs/paths or bytes, not {records.column(f'{m}_struct').type}")
    cols = {f"{side}_{name}": records.column(name) for name in RECORD_SCHEMA.names if name != "id"}
    structs = records.column("audio_struct") if "audio_struct" in names else None
    cols[f"{side}_audio_struct"] = canonical_audio_structs(structs) if structs is not None else pa.nulls(n, AUDIO_STRUCT)
    messages = records.column(MESSAGE_COLUMN) if MESSAGE_COLUMN in names else None
    cols[f"{side}_has_messages"] = pc.is_valid(messages) if messages is not None else pa.nulls(n, pa.bool_())
    return cols


def side_table(ids: pa.ChunkedArray, cells: pa.ChunkedArray | None, root: str, side: str) -> dict:
    """One side's prefixed record columns for a candidates batch."""
    n = len(ids)
    if cells is None:
        return {f"{side}_{f.name}": pa.nulls(n, f.type) for f in SIDE_FIELDS if f.name != "id"}
    table = pa.table({"id": ids.cast(pa.string()), **cell_manifest_columns(cells)})
    if table.num_columns == 1:
        table = table.append_column("text", pa.nulls(n, pa.string()))
    return side_record_columns(normalize_manifest_table(table, root), side)


def normalize_candidates(
    table: pa.Table, root: str, resolved: tuple[str, ...] = (), schema: pa.Schema = PAIR_SCHEMA
) -> pa.Table:
    """Map a candidates batch onto `schema`. Sides in `resolved` are left null for the join."""
    n = table.num_rows
    cols = {}
    ids = {side: table.column(key).cast(pa.string()) for side, key in SIDES.items()}
    cols["id"] = pa.array([pair_id(q, d) for q, d in zip(ids["query"].to_pylist(), ids["doc"].to_pylist())])
    for side, key in SIDES.items():
        # Candidates of conversations only (a `messages` column) may carry no query/doc cells.
        cells = table.column(side) if side not in resolved and side in table.column_names else None
        cols[key] = ids[side]
        cols.update(side_table(ids[side], cells, root, side))
        cols[FOUND[side]] = pa.nulls(n, pa.bool_()) if side in resolved else pa.array([True] * n)
    if MESSAGE_COLUMN in schema.names:
        messages = MESSAGE_COLUMN in table.column_names
        cols[MESSAGE_COLUMN] = table.column(MESSAGE_COLUMN) if messages else pa.nulls(n, schema.field(MESSAGE_COLUMN).type)
    return pa.table(cols).select(schema.names).cast(schema)


def manifest_as_side(records: pa.Table, side: str, schema: pa.Schema = PAIR_SCHEMA) -> pa.Table:
    """Normalised embedding-manifest records as `schema` rows carrying only `side`."""
    n = records.num_rows
    cols = {f.name: pa.nulls(n, f.type) for f in schema}
    cols[f"{side}_id"] = records.column("id")
    cols.update(side_record_columns(records, side))
    cols[FOUND[side]] = pa.array([True] * n)
    return pa.table(cols, schema=schema)


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
    schemas = []
    rows = 0
    for p in files:
        with fs.open(p, "rb") as f:
            pf = pq.ParquetFile(f)
            rows += pf.metadata.num_rows
            schemas.append(pf.schema_arrow.remove_metadata())
    try:
        # Ray reads the files as one dataset, so their column types must agree (null columns promote).
        schema = pa.unify_schemas(schemas, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(f"candidates files of {uri} disagree on column types: {exc}") from None
    spec = InputSpec(
        uri=uri,
        kind="candidates",
        paths=[unstrip(fs, p) for p in files],
        root=unstrip(fs, root),
        num_records=rows,
        columns=list(schema.names),
    )
    spec.schema = schema  # type: ignore[attr-defined]
    return spec


def missing_columns(spec: InputSpec, resolved: tuple[str, ...]) -> list[str]:
    needed = list(SIDES.values())
    # A `messages` conversation is the whole pair, so its candidates need no query/doc cells.
    if MESSAGE_COLUMN not in spec.columns:
        needed += [side for side in SIDES if side not in resolved]
    return [c for c in needed if c not in spec.columns]


def candidate_columns(spec: InputSpec, resolved: tuple[str, ...]) -> list[str]:
    """The candidates' columns the pair stream reads."""
    wanted = [*SIDES.values(), *(s for s in SIDES if s not in resolved), MESSAGE_COLUMN]
    return [c for c in wanted if c in spec.columns]


def candidates_pair_schema(spec: InputSpec) -> pa.Schema:
    schema = getattr(spec, "schema", None)
    if schema is None or MESSAGE_COLUMN not in schema.names:
        return PAIR_SCHEMA
    return pair_schema(schema.field(MESSAGE_COLUMN).type)


def check_cell_types(spec: InputSpec, resolved: tuple[str, ...]) -> None:
    """Normalise an empty batch of the candidates' schema: a cell type no record could be read
    from (a list of messages as one side, an audio struct without samples) fails here, before Ray."""
    empty = spec.schema.empty_table().select(candidate_columns(spec, resolved))  # type: ignore[attr-defined]
    try:
        normalize_candidates(empty, spec.root, resolved, candidates_pair_schema(spec))
    except pa.ArrowException as exc:
        raise InputError(f"candidates {spec.uri}: a column type cannot be read as query/doc cells: {exc}") from None


def sample_pair_modalities(
    spec: InputSpec, resolved: tuple[str, ...], storage_options: dict | None = None, rows: int = 1000
) -> set[str]:
    """Modality labels (`text`, `image`, `audio+text`, `message` for a conversation) of the sides
    of the first candidates, read on the driver, so that a reranker that cannot take them is
    refused before Ray starts. Candidates past the sample are still checked pair by pair."""
    fs, _ = filesystem(spec.uri, storage_options)
    with fs.open(fs._strip_protocol(spec.paths[0]), "rb") as f:
        pf = pq.ParquetFile(f)
        wanted = [c for c in candidate_columns(spec, resolved) if c in pf.schema_arrow.names]
        batch = next(pf.iter_batches(batch_size=rows, columns=wanted), None)
    if batch is None:
        return set()
    table = pa.Table.from_batches([batch])
    pairs = normalize_candidates(table, spec.root, resolved, candidates_pair_schema(spec)).to_pylist()
    labels = set()
    for row in pairs:
        if row.get(MESSAGE_COLUMN) is not None:
            labels.add("message")
            continue
        for side in SIDES:
            if side not in resolved:
                labels.add(record_modality({f.name: row[f"{side}_{f.name}"] for f in SIDE_FIELDS}))
    return labels - {""}


def read_parquet(paths: list[str], uri: str, storage_options: dict | None = None, num_cpus: float = 0.25,
                 columns: list[str] | None = None):
    """A Ray dataset over Parquet files (of `columns`, default all), read through fsspec so any URI scheme works."""
    import ray.data
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = filesystem(uri, storage_options)
    return ray.data.read_parquet(
        [fs._strip_protocol(p) for p in paths],
        filesystem=PyFileSystem(FSSpecHandler(fs)),
        num_cpus=num_cpus,
        columns=columns,
    )


def read_parquet_local(paths: list[str], storage_options: dict | None = None, columns: list[str] | None = None,
                       batch_rows: int = 4096):
    """The same files as `read_parquet`, as Arrow tables of at most `batch_rows` read in this process
    (the in-process executor); memory holds a batch, not a file."""
    for path in paths:
        fs, stripped = filesystem(path, storage_options)
        with fs.open(stripped, "rb") as f:
            # No pyarrow threads on a Python file object (see inputs/discover.py repeated_keys).
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns, use_threads=False):
                yield pa.Table.from_batches([batch])


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
        wanted = candidate_columns(self.candidates, resolved)
        schema = candidates_pair_schema(self.candidates)
        ds = read_parquet(self.candidates.paths, self.candidates.uri, self.storage_options, self.read_cpus)
        ds = ds.map_batches(
            # A file may lack a column others have (e.g. `messages`): read what each block holds.
            lambda t: normalize_candidates(
                t.select([c for c in wanted if c in t.column_names]), self.candidates.root, resolved, schema
            ),
            batch_format="pyarrow",
            num_cpus=self.read_cpus,
        )
        for side, spec in self.manifests.items():
            records = ReadStage(spec, self.storage_options, read_cpus=self.read_cpus).dataset()
            records = records.map_batches(
                lambda t, side=side: manifest_as_side(t, side, schema),
                batch_format="pyarrow",
                num_cpus=self.read_cpus,
            )
            ds = (
                ds.union(records)
                .groupby(SIDES[side], num_partitions=self.num_partitions)
                .map_groups(attach_side, fn_kwargs={"side": side}, batch_format="pyarrow", num_cpus=self.read_cpus)
            )
        return ds

    def tables(self, block_rows: int = 256):
        """The same pairs in this process, as blocks of at most `block_rows` (the in-process executor:
        inputs small enough to hold). A side looked up in a manifest is joined as the Ray shuffle
        joins it: the manifest's rows and the candidates grouped by that side's id."""
        from mmembed.stages.read import ReadStage

        resolved = tuple(self.manifests)
        wanted = candidate_columns(self.candidates, resolved)
        schema = candidates_pair_schema(self.candidates)
        fs, _ = filesystem(self.candidates.uri, self.storage_options)
        parts = []
        for path in self.candidates.paths:
            with fs.open(fs._strip_protocol(path), "rb") as f:
                pf = pq.ParquetFile(f)
                t = pf.read(columns=[c for c in wanted if c in pf.schema_arrow.names], use_threads=False)
            parts.append(normalize_candidates(t, self.candidates.root, resolved, schema))
        table = pa.concat_tables(parts) if parts else schema.empty_table()
        for side, spec in self.manifests.items():
            records = [manifest_as_side(t, side, schema) for t in ReadStage(spec, self.storage_options).tables()]
            joined = [attach_side(g, side) for g in groups_by(pa.concat_tables([table, *records]), SIDES[side])]
            table = pa.concat_tables(joined) if joined else schema.empty_table()
        for start in range(0, table.num_rows, block_rows):
            yield table.slice(start, block_rows)
