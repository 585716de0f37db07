"""How an input URI is recognised before Ray starts: a Parquet manifest, a folder of media files or
PDFs, or WebDataset tar shards (what a record is: mmembed/schema.py).

A record is one row with a string ``id`` and one or more modality cells. A manifest row with
``text`` and ``image`` set is one multimodal record, like ST's ``{"text": ..., "image": ...}``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from mmembed.schema import (  # noqa: F401 - the record definition, re-exported for the readers
    AUDIO_EXTENSIONS,
    CELL_ERROR,
    DEFAULT_COLUMNS,
    DOCUMENT_EXTENSIONS,
    EXTENSION_MODALITY,
    IMAGE_EXTENSIONS,
    MEDIA_MODALITIES,
    MESSAGE_COLUMN,
    MODALITIES,
    MODALITY_COLUMNS,
    PAGE_MARK,
    RECORD_SCHEMA,
    TEXT_EXTENSIONS,
    VIDEO_EXTENSIONS,
    Columns,
    input_modality,
)
from mmembed.storage.fs import filesystem, unstrip


class InputError(ValueError):
    """The input cannot be read as a manifest or a media directory; raised before Ray starts."""


@dataclass
class InputSpec:
    """What the driver learned about the input without reading the corpus."""

    uri: str
    kind: str  # "manifest" | "media"
    paths: list[str] = field(default_factory=list)  # manifest files, or media files
    root: str = ""  # the directory relative ids and relative media paths resolve against
    num_records: int = 0
    modalities: set[str] = field(default_factory=set)
    columns: list[str] = field(default_factory=list)
    fingerprint: str = ""
    mapping: Columns = DEFAULT_COLUMNS  # which column is which, and the modalities kept
    # WebDataset shards are not counted before they are read: num_records is an estimate from the
    # first shard's records per byte, for sizing pools only; the manifest counts what was read.
    estimated: bool = False
    documents: int = 0  # PDFs among the records: each becomes its pages
    labels: set[str] = field(default_factory=set)  # modality labels of a sample of records (shards)


def modality_of_extension(path: str) -> str | None:
    return EXTENSION_MODALITY.get(os.path.splitext(path)[1].lower())


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def discover(uri: str, storage_options: dict | None = None, columns: Columns = DEFAULT_COLUMNS) -> InputSpec:
    """Classify the input as a Parquet manifest or a media tree, and list its files."""
    fs, path = filesystem(uri, storage_options)
    # Listings with details: sizes and ETags for the fingerprint come with the listing pages,
    # not from a request per file.
    if "{" in path:  # a brace range of shards, `shards-{000000..000099}.tar`
        from mmembed.inputs.webdataset import expand_braces

        try:
            listed = expand_braces(path)
        except ValueError as exc:
            raise InputError(f"{uri}: {exc}") from None
        missing = [p for p in listed if not fs.exists(p)]
        if missing:
            raise InputError(f"{len(missing)} of the {len(listed)} files of {uri} are missing, e.g. {missing[0]}")
        infos = {p: fs.info(p) for p in listed}
        root = path.split("{", 1)[0].rsplit("/", 1)[0] if "/" in path else ""
    elif _is_glob(path):
        infos = {p: i for p, i in fs.glob(path, detail=True).items() if i.get("type") != "directory"}
        root = path.split("*", 1)[0].rsplit("/", 1)[0] if "/" in path else ""
    elif fs.isdir(path):
        infos = fs.find(path, detail=True)
        root = path
    elif fs.exists(path):
        infos = {path: fs.info(path)}
        root = path.rsplit("/", 1)[0] if "/" in path else ""
    else:
        raise InputError(f"input not found: {uri}")
    found = sorted(infos)
    # Hidden and bookkeeping files (._SUCCESS, _metadata, .tmp shards) are never records.
    found = [p for p in found if not any(part.startswith((".", "_")) for part in p[len(root) :].split("/") if part)]
    if not found:
        raise InputError(f"input has no files: {uri}")
    parquet = [p for p in found if p.endswith(".parquet")]
    if parquet:
        # Media files next to a manifest are what its relative paths point at, not records.
        return _manifest_spec(uri, fs, parquet, root, infos, columns)
    if columns.custom():
        raise InputError(f"--{'/--'.join(f'{k}-column' for k in columns.custom())} name manifest columns, but {uri} "
                         "is a folder of media files (no Parquet manifest); drop them")
    tars = [p for p in found if p.endswith(".tar")]
    if tars:
        return _webdataset_spec(uri, fs, tars, root, infos, columns, skipped=len(found) - len(tars))
    # Files of a modality --modalities leaves out are not records of this run, like unknown extensions.
    media = [p for p in found if modality_of_extension(p) and columns.keeps(modality_of_extension(p))]
    skipped = len(found) - len(media)
    spec = InputSpec(
        uri=uri,
        kind="media",
        paths=[unstrip(fs, p) for p in media],
        root=unstrip(fs, root),
        num_records=len(media),
        modalities={input_modality(modality_of_extension(p)) for p in media},
        mapping=columns,
        documents=sum(1 for p in media if modality_of_extension(p) == "pdf"),
    )
    if spec.documents:
        spec.estimated = True  # pages are counted as they are rendered
    if not media:
        raise InputError(
            f"no media files with a known extension under {uri} ({skipped} other files). Known: "
            + ", ".join(sorted(EXTENSION_MODALITY))
        )
    spec.skipped_files = skipped  # type: ignore[attr-defined]
    spec.fingerprint = _fingerprint(media, infos)
    return spec


def _webdataset_spec(uri: str, fs, tars: list[str], root: str, infos: dict[str, dict], mapping: Columns,
                     skipped: int) -> InputSpec:
    from mmembed.inputs.webdataset import sample_shard

    first = unstrip(fs, tars[0])
    labels, records, nbytes = sample_shard(first, fs, mapping)
    total = sum(int(infos[p].get("size") or 0) for p in tars)
    estimate = max(len(tars), int(total * records / nbytes) if records and nbytes else len(tars))
    spec = InputSpec(
        uri=uri,
        kind="webdataset",
        paths=[unstrip(fs, p) for p in tars],
        root=unstrip(fs, root),
        num_records=estimate,
        modalities={m for label in labels for m in label.split("+")},
        mapping=mapping,
        estimated=True,
        labels=labels,
    )
    spec.skipped_files = skipped  # type: ignore[attr-defined]
    spec.fingerprint = _fingerprint(tars, infos)
    return spec


def _fingerprint(paths: list[str], infos: dict[str, dict]) -> str:
    """A cheap identity of the input: its file names, sizes and modification markers (from the listing)."""
    import hashlib

    h = hashlib.sha256()
    for p in paths:
        info = infos[p]
        marker = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
        h.update(f"{p}\0{info.get('size')}\0{marker}\n".encode())
    return h.hexdigest()[:16]


def _manifest_spec(uri: str, fs, paths: list[str], root: str, infos: dict[str, dict],
                   mapping: Columns = DEFAULT_COLUMNS) -> InputSpec:
    sources = mapping.sources()
    columns: list[str] | None = None
    num_rows = 0
    non_null: set[str] = set()
    types: dict[str, tuple[str, str]] = {}
    documents: int | None = 0  # rows with a `pdf` cell, from row-group statistics (None: not recorded)
    for p in paths:
        with fs.open(p, "rb") as f:
            meta = pq.ParquetFile(f).metadata
            schema = pq.ParquetFile(f).schema_arrow
        names = list(schema.names)
        if columns is None:
            columns = names
            missing = {k: v for k, v in mapping.custom().items() if v not in names}
            if missing:
                flags = ", ".join(f"--{k}-column {v}" for k, v in missing.items())
                raise InputError(f"manifest {p} has no column for {flags}; its columns: {', '.join(names)}")
        for col in MODALITY_COLUMNS:
            src = sources[col]
            if src in names and not pa.types.is_null(schema.field(src).type):
                kind = "string" if pa.types.is_string(schema.field(src).type) or pa.types.is_large_string(
                    schema.field(src).type) else str(schema.field(src).type)
                first = types.setdefault(col, (kind, p))
                if first[0] != kind:
                    # Ray unifies a dataset's schema, so mixed cell kinds would be cast and misread.
                    raise InputError(
                        f"manifest column {col!r} is {first[0]} in {first[1]} but {kind} in {p}; keep one kind "
                        "per column (URI/path strings or raw bytes), e.g. split the manifest in two runs"
                    )
        num_rows += meta.num_rows
        if "pdf" in names and documents is not None and mapping.keeps("pdf"):
            idx = names.index("pdf")
            for rg in range(meta.num_row_groups):
                stats = meta.row_group(rg).column(idx).statistics
                if stats is None or not stats.has_null_count:
                    documents = None
                    break
                documents += meta.row_group(rg).num_rows - stats.null_count
        for col in (*MODALITY_COLUMNS, MESSAGE_COLUMN, "pdf"):
            src = sources.get(col, col)
            if src not in names or col in non_null:
                continue
            # Row-group statistics give the null count without reading the column.
            idx = names.index(src)
            for rg in range(meta.num_row_groups):
                c = meta.row_group(rg).column(idx) if idx < meta.num_columns else None
                stats = c.statistics if c is not None else None
                if stats is None or not stats.has_null_count or stats.null_count < meta.row_group(rg).num_rows:
                    non_null.add(col)
                    break
    columns = columns or []
    if mapping.id not in columns:
        raise InputError(f"manifest {uri} has no `{mapping.id}` column; found columns: {columns}. Name the id "
                         "column with --id-column")
    present = [c for c in (*MODALITY_COLUMNS, MESSAGE_COLUMN, "pdf") if sources.get(c, c) in columns
               and mapping.keeps("message" if c == MESSAGE_COLUMN else c)]
    if not present:
        kept = f" among --modalities {','.join(mapping.modalities)}" if mapping.modalities else ""
        raise InputError(
            f"manifest {uri} has no modality column{kept}; expected one or more of "
            f"{[sources.get(c, c) for c in (*MODALITY_COLUMNS, MESSAGE_COLUMN)]}, found: {columns}. Name them with "
            "--text-column, --image-column, --audio-column, --video-column"
        )
    modalities = {"message" if c == MESSAGE_COLUMN else c for c in non_null}
    modalities = {input_modality(m) for m in modalities if mapping.keeps(m)}
    spec = InputSpec(
        uri=uri,
        kind="manifest",
        paths=[unstrip(fs, p) for p in paths],
        root=unstrip(fs, root),
        num_records=num_rows,
        modalities=modalities,
        columns=columns,
        mapping=mapping,
        # A manifest's documents are not counted before their pages are rendered.
        estimated="pdf" in non_null,
        documents=documents or 0,
    )
    spec.fingerprint = _fingerprint(paths, infos)
    return spec


def check_unique_ids(spec: InputSpec, storage_options: dict | None = None, show: int = 5) -> None:
    """Reject a manifest with duplicate ids before Ray starts."""
    if spec.kind != "manifest":
        return
    repeated = repeated_keys(spec, [spec.mapping.id], storage_options)
    if repeated:
        first = ", ".join(repr(k[0]) for k in repeated[:show])
        raise InputError(f"manifest {spec.uri} has {len(repeated)} duplicate ids (ids must be unique); first: {first}")


def repeated_keys(spec: InputSpec, columns: list[str], storage_options: dict | None = None) -> list[tuple]:
    """The keys (tuples of `columns`) that more than one row of the dataset holds, in first-seen order.

    Only the key columns are read, a row group at a time, and keys are kept as 64-bit hashes (8 bytes a
    row), so this stays cheap on the driver at corpus scale; hash collisions are confirmed on the keys.
    """
    import numpy as np
    import pandas as pd

    def hashed(table: pa.Table) -> np.ndarray:
        return pd.util.hash_pandas_object(table.to_pandas(), index=False).to_numpy()

    fs, _ = filesystem(spec.uri, storage_options)
    hashes = []
    for p in spec.paths:
        with fs.open(fs._strip_protocol(p), "rb") as f:
            pf = pq.ParquetFile(f)
            for rg in range(pf.num_row_groups):
                table = pf.read_row_group(rg, columns=columns, use_threads=False)
                for name, col in zip(columns, table.columns):
                    if col.null_count:
                        raise InputError(f"{p} has {col.null_count} null values in `{name}`; every row needs one")
                hashes.append(hashed(table))
    if not hashes:
        return []
    allh = np.concatenate(hashes)
    allh.sort()
    wanted = set(np.unique(allh[1:][allh[1:] == allh[:-1]]).tolist())
    if not wanted:
        return []
    counts: dict[tuple, int] = {}
    for p in spec.paths:
        with fs.open(fs._strip_protocol(p), "rb") as f:
            table = pq.read_table(f, columns=columns, use_threads=False)
        for key, h in zip(zip(*(c.to_pylist() for c in table.columns)), hashed(table)):
            if int(h) in wanted:
                counts[key] = counts.get(key, 0) + 1
    return [k for k, n in counts.items() if n > 1]


def record_modality(row: dict) -> str:
    """The modality label written to the output: `text`, `image`, or e.g. `image+text`."""
    parts = []
    for m in MODALITY_COLUMNS:
        if (
            (m == "text" and (row.get("text") is not None or row.get("text_uri") is not None))
            or row.get(f"{m}_uri") is not None
            or row.get(f"{m}_bytes") is not None
            or row.get(f"{m}_struct") is not None
        ):
            parts.append(m)
    if row.get(MESSAGE_COLUMN) is not None:
        parts.append("message")
    if row.get("pdf_uri") is not None or row.get("pdf_bytes") is not None:
        parts.append("pdf")
    if row.get("image_page") is not None:
        parts.append("image")
    return "+".join(sorted(parts))
