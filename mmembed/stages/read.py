"""Stage 1, read: turn a manifest or a media tree into a stream of records.

Rows leave this stage in `RECORD_SCHEMA`: an id, the text, and for each media modality
either a URI or the raw bytes. Nothing is fetched or decoded here; that is the CPU pool's job,
so a missing object becomes an error row there instead of failing a read task.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc

from mmembed.inputs.discover import (
    CELL_ERROR,
    DEFAULT_COLUMNS,
    MEDIA_MODALITIES,
    RECORD_SCHEMA,
    Columns,
    InputSpec,
    modality_of_extension,
)
from mmembed.storage.fs import filesystem, is_absolute_uri, join_uri

LISTING_BLOCK_ROWS = 2_000


def _mapped(table: pa.Table, mapping: Columns) -> pa.Table:
    """The manifest's columns under their record names (--*-column), without the modalities that
    --modalities leaves out; other columns are not read as cells."""
    cols = {}
    for name, src in mapping.sources().items():
        if src in table.column_names and (name == "id" or mapping.keeps(name)):
            cols[name] = table.column(src)
    if "text_uri" in table.column_names and mapping.keeps("text") and mapping.text == "text":
        cols["text_uri"] = table.column("text_uri")
    if "messages" in table.column_names and mapping.keeps("message"):
        cols["messages"] = table.column("messages")
    if "pdf" in table.column_names and mapping.keeps("pdf"):
        cols["pdf"] = table.column("pdf")
    return pa.table(cols) if cols else table.select([])


def _hf_media(col: pa.ChunkedArray, modality: str, root: str):
    """A Hugging Face datasets Image/Audio/Video cell, struct<bytes, path>: (uri, bytes, why not).

    The bytes win; a path is resolved as a media URI; a struct with neither is an error, said so.
    """
    fields = {f.name for f in col.type}
    n = len(col)
    data = pc.struct_field(col, "bytes").cast(pa.binary()) if "bytes" in fields else pa.nulls(n, pa.binary())
    path = pc.struct_field(col, "path").cast(pa.string()) if "path" in fields else pa.nulls(n, pa.string())
    path = pc.if_else(pc.is_valid(data), pa.scalar(None, pa.string()), path)
    empty = pc.and_(pc.is_valid(col), pc.and_(pc.is_null(data), pc.is_null(path)))
    why = pc.if_else(empty, pa.scalar(f"{modality} cell holds neither bytes nor a path (a Hugging Face "
                                      f"{modality.capitalize()} feature with no data)"), pa.scalar(None, pa.string()))
    return _resolve(path, root), data, why


def is_hf_media(t: pa.DataType) -> bool:
    return pa.types.is_struct(t) and bool({f.name for f in t} & {"bytes", "path"}) and "array" not in {f.name for f in t}


def normalize_manifest_table(table: pa.Table, root: str, mapping: Columns = DEFAULT_COLUMNS) -> pa.Table:
    """Map a manifest's columns onto RECORD_SCHEMA.

    Media cells may be strings (URI or path; relative paths resolve against the manifest's
    directory), raw bytes, or Hugging Face datasets structs {bytes, path}. Each lands in its own
    typed column.
    """
    table = _mapped(table, mapping)
    n = table.num_rows
    out = {"id": table.column("id").cast(pa.string())}
    names = table.column_names
    cell_error = pa.nulls(n, pa.string())
    out["text"] = table.column("text").cast(pa.string()) if "text" in names else pa.nulls(n, pa.string())
    if "text_uri" in names:
        out["text_uri"] = _resolve(table.column("text_uri").cast(pa.string()), root)
    for m in MEDIA_MODALITIES:
        uri = pa.nulls(n, pa.string())
        data = pa.nulls(n, pa.binary())
        if m in names:
            col = table.column(m)
            if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
                data = col.cast(pa.binary())
            elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                uri = _resolve(col.cast(pa.string()), root)
            elif pa.types.is_null(col.type):
                pass
            elif is_hf_media(col.type):
                uri, data, why = _hf_media(col, m, root)
                cell_error = pc.coalesce(cell_error, why)
            else:
                # Structs such as {"array", "sampling_rate"} are carried as-is for the audio path.
                out[f"{m}_struct"] = col
        out[f"{m}_uri"] = uri
        out[f"{m}_bytes"] = data
    if "messages" in names:
        out["messages"] = table.column("messages")
    if "pdf" in names:
        col = table.column("pdf")
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            out["pdf_bytes"] = col.cast(pa.binary())
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            out["pdf_uri"] = _resolve(col.cast(pa.string()), root)
    out[CELL_ERROR] = cell_error
    return _conform(pa.table(out))


def _resolve(col: pa.ChunkedArray, root: str) -> pa.ChunkedArray:
    values = col.to_pylist()
    if not root or all(v is None or is_absolute_uri(v) for v in values):
        return col
    return pa.chunked_array(
        [pa.array([v if v is None or is_absolute_uri(v) else join_uri(root, v) for v in values], pa.string())]
    )


def _conform(table: pa.Table) -> pa.Table:
    """Every block gets every RECORD_SCHEMA column, so blocks concatenate without surprises."""
    n = table.num_rows
    for f in RECORD_SCHEMA:
        if f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(n, f.type))
    extra = [c for c in table.column_names if c not in RECORD_SCHEMA.names]
    return table.select(RECORD_SCHEMA.names + extra)


class ReadStage:
    """Builds the record stream for an input. Runs on the driver; reads happen in Ray tasks."""

    def __init__(
        self,
        spec: InputSpec,
        storage_options: dict | None = None,
        *,
        read_cpus: float = 0.25,
        block_rows: int | None = None,
    ):
        self.spec = spec
        self.storage_options = storage_options or {}
        self.read_cpus = read_cpus
        # A preprocess actor works through one block at a time, so a corpus that arrives as a
        # few big blocks (a manifest file is one block up to 128 MiB) would keep the rest of the
        # pool idle. Blocks of at most this many rows spread it over every actor.
        self.block_rows = block_rows

    def dataset(self):
        import ray.data

        if self.spec.kind == "manifest":
            return self._manifest()
        if self.spec.kind == "webdataset":
            return self._shards(ray.data)
        return self._listing(ray.data)

    def _shard_rows(self) -> list[dict]:
        root = self.spec.root.rstrip("/")
        return [{"uri": p, "shard": _relative_id(p, root)} for p in self.spec.paths]

    def _shards(self, data):
        """One read task per shard, streaming its records out block by block (mmembed/inputs/webdataset.py)."""
        from mmembed.inputs.webdataset import read_shards

        shards = self._shard_rows()
        ds = data.from_items(shards, override_num_blocks=len(shards)).map_batches(
            read_shards,
            fn_kwargs={"storage_options": self.storage_options, "mapping": self.spec.mapping,
                       "block_rows": self.block_rows or LISTING_BLOCK_ROWS},
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=self.read_cpus,
        )
        if self.block_rows:
            ds = ds.repartition(target_num_rows_per_block=self.block_rows)
        return ds

    def _manifest(self):
        import ray.data
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, _ = filesystem(self.spec.uri, self.storage_options)
        paths = [fs._strip_protocol(p) for p in self.spec.paths]
        ds = ray.data.read_parquet(
            paths,
            filesystem=PyFileSystem(FSSpecHandler(fs)),
            num_cpus=self.read_cpus,
        )
        root = self.spec.root
        ds = ds.map_batches(
            normalize_manifest_table,
            fn_kwargs={"root": root, "mapping": self.spec.mapping},
            batch_format="pyarrow",
            batch_size=None,
            zero_copy_batch=True,
            num_cpus=self.read_cpus,
        )
        if self.block_rows:
            # Streaming: blocks are split (and small ones combined) as they pass, no barrier.
            ds = ds.repartition(target_num_rows_per_block=self.block_rows)
        return ds

    def _listing(self, data):
        return data.from_arrow(list(self._listing_tables()))

    def _listing_tables(self):
        root = self.spec.root.rstrip("/")
        step = min(self.block_rows or LISTING_BLOCK_ROWS, LISTING_BLOCK_ROWS)
        for start in range(0, len(self.spec.paths), step):
            chunk = self.spec.paths[start : start + step]
            cols = {f.name: pa.nulls(len(chunk), f.type) for f in RECORD_SCHEMA}
            ids = [_relative_id(p, root) for p in chunk]
            cols["id"] = pa.array(ids, pa.string())
            mods = [modality_of_extension(p) for p in chunk]
            for m in MEDIA_MODALITIES:
                cols[f"{m}_uri"] = pa.array([p if mm == m else None for p, mm in zip(chunk, mods)], pa.string())
            cols["text_uri"] = pa.array([p if mm == "text" else None for p, mm in zip(chunk, mods)], pa.string())
            cols["pdf_uri"] = pa.array([p if mm == "pdf" else None for p, mm in zip(chunk, mods)], pa.string())
            yield _conform(pa.table(cols))

    def tables(self):
        """The same records as `dataset()`, as Arrow tables read in this process (no Ray).

        For the in-process executor: a manifest is read one row batch at a time, so memory holds
        a block, not the file.
        """
        if self.spec.kind == "webdataset":
            from mmembed.inputs.webdataset import read_shard

            for shard in self._shard_rows():
                yield from read_shard(shard["uri"], shard["shard"], self.storage_options, mapping=self.spec.mapping,
                                      block_rows=self.block_rows or LISTING_BLOCK_ROWS)
            return
        if self.spec.kind != "manifest":
            yield from self._listing_tables()
            return
        import pyarrow.parquet as pq

        fs, _ = filesystem(self.spec.uri, self.storage_options)
        rows = self.block_rows or LISTING_BLOCK_ROWS
        for path in self.spec.paths:
            with fs.open(fs._strip_protocol(path), "rb") as f:
                # No pyarrow threads on a Python file object (see inputs/discover.py repeated_keys).
                for batch in pq.ParquetFile(f).iter_batches(batch_size=rows, use_threads=False):
                    yield normalize_manifest_table(pa.Table.from_batches([batch]), self.spec.root, self.spec.mapping)


def _relative_id(path: str, root: str) -> str:
    if root and path.startswith(root + "/"):
        return path[len(root) + 1 :]
    if root and path.startswith(root + os.sep):
        return path[len(root) + len(os.sep) :]
    return path


def count_non_null(table: pa.Table, column: str) -> int:
    return len(table) - pc.sum(pc.is_null(table.column(column))).as_py()


# Columns that hold each modality of a record, as `split_modalities` separates them.
_MODALITY_CELLS = {
    "text": ("text", "text_uri"),
    **{m: (f"{m}_uri", f"{m}_bytes", f"{m}_struct") for m in MEDIA_MODALITIES},
    "message": ("messages",),
}


def split_modalities(table: pa.Table) -> pa.Table:
    """One record per (id, modality): `--split-modalities`.

    Every row with a modality cell becomes one row per modality, holding only that modality's
    cells, with id `<id>#<modality>` (modality: text, image, audio, video or message); the part
    before the last `#` is the source id. A record with no modality cell passes through unchanged
    and becomes an error row downstream.
    """
    names = table.column_names
    pieces, any_cell = [], None
    for modality, cells in _MODALITY_CELLS.items():
        present = [c for c in cells if c in names]
        if not present:
            continue
        mask = pc.is_valid(table.column(present[0]))
        for c in present[1:]:
            mask = pc.or_(mask, pc.is_valid(table.column(c)))
        any_cell = mask if any_cell is None else pc.or_(any_cell, mask)
        part = table.filter(mask)
        if not part.num_rows:
            continue
        others = {c for cs in _MODALITY_CELLS.values() for c in cs} - set(present)
        cols = []
        for name in names:
            col = part.column(name)
            if name == "id":
                col = pc.binary_join_element_wise(col, pa.scalar(modality), "#")
            elif name in others:
                col = pa.nulls(part.num_rows, col.type)
            cols.append(col)
        pieces.append(pa.table(cols, schema=part.schema))
    if any_cell is not None:
        empty = table.filter(pc.invert(any_cell))
        if empty.num_rows:
            pieces.append(empty)
    return pa.concat_tables(pieces) if pieces else table


def sample_record_modalities(spec: InputSpec, storage_options: dict | None = None, rows: int = 1000) -> set[str]:
    """Modality labels (e.g. `image+text`) of the first records of a manifest, read on the driver.

    Parquet statistics say which columns hold values but not whether one row fills several, so a
    bounded sample of the first file (one batch, only the modality columns) finds multimodal
    records before Ray starts. Records past the sample are still checked per record downstream.
    """
    import pyarrow.parquet as pq

    from mmembed.inputs.discover import MESSAGE_COLUMN, MODALITY_COLUMNS, record_modality

    if spec.kind == "webdataset":
        return set(spec.labels)
    if spec.kind != "manifest" or not spec.paths:
        return set()
    fs, _ = filesystem(spec.uri, storage_options)
    sources = spec.mapping.sources()
    wanted = list(dict.fromkeys(c for c in (sources["id"], "text_uri", *(sources[m] for m in MODALITY_COLUMNS),
                                            MESSAGE_COLUMN) if c in spec.columns))
    with fs.open(fs._strip_protocol(spec.paths[0]), "rb") as f:
        pf = pq.ParquetFile(f)
        batch = next(pf.iter_batches(batch_size=rows, columns=wanted), None)
    if batch is None:
        return set()
    table = normalize_manifest_table(pa.Table.from_batches([batch]), "", spec.mapping)
    return {record_modality(r) for r in table.drop_columns(["id"]).to_pylist()} - {""}
