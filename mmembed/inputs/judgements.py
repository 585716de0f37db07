"""Queries and relevance judgements (qrels) for `mmembed evaluate`, in the layouts people already have.

    BEIR:    queries.jsonl  one JSON object per line, `_id` (or `id`) and `text`
             qrels/<split>.tsv  `query-id<TAB>corpus-id<TAB>score`, with that header
    Parquet: queries  `id` plus the embed job's input columns (`text`, `image`, ...: multimodal queries)
             qrels    `query_id`, `corpus_id`, `score`

A file, a directory of `*.parquet`, local or any fsspec URI. Everything is checked here, before a model
loads: a malformed line names its line number, qrels that name a query the query file lacks are
refused, and so are qrels with no judgement or no relevant one. Relevance is binary, as ST's
InformationRetrievalEvaluator takes it: a judged document with score > 0 is relevant.

Each side is fingerprinted by the bytes of its files, so an evaluation on the same files is found
again (`_eval/` records). The fingerprint of Parquet queries covers the manifest, not the media it
points at: replace an image in place and keep its path, and pass --recompute.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from mmembed.errors import UsageError
from mmembed.storage.fs import filesystem, unstrip

QREL_COLUMNS = ("query_id", "corpus_id", "score")
BEIR_QREL_HEADER = ("query-id", "corpus-id", "score")
MAX_NAMED = 5


@dataclass
class Queries:
    uri: str
    kind: str  # "jsonl" or "parquet"
    ids: list[str]
    texts: dict[str, str] | None  # jsonl only: what the embed job gets, written to Parquet by the caller
    fingerprint: str


@dataclass
class Qrels:
    uri: str
    relevant: dict[str, set[str]]  # query id -> corpus ids judged relevant (score > 0), as ST takes them
    judgements: int  # (query, document) pairs judged, relevant or not
    fingerprint: str
    graded: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def relevant_pairs(self) -> int:
        return sum(len(v) for v in self.relevant.values())

    def corpus_ids(self) -> set[str]:
        return {cid for docs in self.relevant.values() for cid in docs}


def _files(uri: str, storage_options: dict | None, flag: str) -> tuple[object, list[str]]:
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        raise UsageError(f"{flag} {uri} does not exist")
    if fs.isdir(path):
        files = sorted(fs.glob(f"{path.rstrip('/')}/*.parquet"))
        if not files:
            raise UsageError(f"{flag} {uri} is a directory with no *.parquet files")
        return fs, files
    return fs, [path]


def _read_bytes(fs, paths: list[str]) -> tuple[list[bytes], str]:
    """Each file's bytes and one fingerprint over all of them (name-independent, order as listed)."""
    digest = hashlib.sha256()
    blobs = []
    for path in paths:
        data = fs.cat_file(path)
        digest.update(hashlib.sha256(data).digest())
        blobs.append(data)
    return blobs, "sha256:" + digest.hexdigest()


def _is_parquet(paths: list[str], blobs: list[bytes]) -> bool:
    return len(paths) > 1 or paths[0].endswith(".parquet") or blobs[0][:4] == b"PAR1"


def _parquet(blobs: list[bytes], flag: str, uri: str) -> pa.Table:
    try:
        return pa.concat_tables([pq.read_table(io.BytesIO(b)) for b in blobs], promote_options="permissive")
    except (pa.ArrowInvalid, OSError) as exc:
        raise UsageError(f"{flag} {uri} is not readable Parquet: {exc}") from None


def _named(values) -> str:
    values = sorted(values)
    more = f" and {len(values) - MAX_NAMED} more" if len(values) > MAX_NAMED else ""
    return ", ".join(repr(v) for v in values[:MAX_NAMED]) + more


def read_queries(uri: str, storage_options: dict | None = None) -> Queries:
    fs, paths = _files(uri, storage_options, "--queries")
    blobs, fingerprint = _read_bytes(fs, paths)
    if _is_parquet(paths, blobs):
        table = _parquet(blobs, "--queries", uri)
        if "id" not in table.column_names:
            raise UsageError(f"--queries {uri}: Parquet queries need an `id` column (and the inputs to embed: "
                             f"text, image, ...); it has {table.column_names}")
        ids = [str(v) for v in table.column("id").to_pylist()]
        texts = None
        kind = "parquet"
        # The embed job reads the user's own file, so its relative media paths keep their meaning.
        source = unstrip(fs, paths[0]) if len(paths) == 1 else uri
    else:
        ids, texts = [], {}
        for n, line in enumerate(blobs[0].decode("utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"--queries {uri} line {n}: not JSON ({exc.msg}); expected BEIR's queries.jsonl, "
                                 'one {"_id": ..., "text": ...} object per line') from None
            qid = obj.get("_id", obj.get("id")) if isinstance(obj, dict) else None
            if qid is None or not isinstance(obj.get("text"), str):
                raise UsageError(f"--queries {uri} line {n}: needs `_id` and a string `text` (BEIR's queries.jsonl)")
            ids.append(str(qid))
            texts[str(qid)] = obj["text"]
        kind, source = "jsonl", uri
    if not ids:
        raise UsageError(f"--queries {uri} holds no queries")
    seen, dup = set(), set()
    for qid in ids:
        (dup if qid in seen else seen).add(qid)
    if dup:
        raise UsageError(f"--queries {uri} repeats query ids: {_named(dup)}")
    return Queries(source, kind, ids, texts, fingerprint)


def _qrel_rows(blobs: list[bytes], paths: list[str], uri: str):
    """(line, query id, corpus id, score) rows of a TSV or Parquet qrels file."""
    if _is_parquet(paths, blobs):
        table = _parquet(blobs, "--qrels", uri)
        missing = [c for c in QREL_COLUMNS if c not in table.column_names]
        if missing:
            raise UsageError(f"--qrels {uri}: Parquet qrels need columns {list(QREL_COLUMNS)}; missing {missing}")
        for n, (q, c, s) in enumerate(zip(*(table.column(x).to_pylist() for x in QREL_COLUMNS)), start=1):
            if q is None or c is None or s is None:
                raise UsageError(f"--qrels {uri} row {n}: empty query_id, corpus_id or score")
            yield f"row {n}", str(q), str(c), s
        return
    lines = blobs[0].decode("utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.rstrip("\r").split("\t")
        if n == 1 and tuple(f.strip().lower() for f in fields) == BEIR_QREL_HEADER:
            continue
        if n == 1 and len(fields) == 3:
            try:
                float(fields[2])
            except ValueError:
                raise UsageError(f"--qrels {uri} line 1: header {fields} is not BEIR's "
                                 f"{'<TAB>'.join(BEIR_QREL_HEADER)}") from None
        if len(fields) != 3:
            raise UsageError(f"--qrels {uri} line {n}: {len(fields)} tab-separated fields, expected 3 "
                             f"({', '.join(BEIR_QREL_HEADER)})")
        yield f"line {n}", fields[0].strip(), fields[1].strip(), fields[2].strip()


def read_qrels(uri: str, queries: Queries, storage_options: dict | None = None) -> Qrels:
    fs, paths = _files(uri, storage_options, "--qrels")
    blobs, fingerprint = _read_bytes(fs, paths)
    graded: dict[str, dict[str, float]] = {}
    judgements = 0
    for where, qid, cid, raw in _qrel_rows(blobs, paths, uri):
        try:
            score = float(raw)
        except (TypeError, ValueError):
            raise UsageError(f"--qrels {uri} {where}: score {raw!r} is not a number") from None
        if not qid or not cid:
            raise UsageError(f"--qrels {uri} {where}: empty query or corpus id")
        graded.setdefault(qid, {})[cid] = score  # a repeated pair keeps its last score, as BEIR's loader
        judgements += 1
    if not judgements:
        raise UsageError(f"--qrels {uri} holds no judgements")
    unknown = set(graded) - set(queries.ids)
    if unknown:
        raise UsageError(f"--qrels {uri} names {len(unknown)} query id(s) that --queries {queries.uri} lacks: "
                         f"{_named(unknown)}")
    relevant = {q: {c for c, s in docs.items() if s > 0} for q, docs in graded.items()}
    relevant = {q: docs for q, docs in relevant.items() if docs}
    if not relevant:
        raise UsageError(f"--qrels {uri}: no judgement has a score > 0, so no query has a relevant document")
    return Qrels(uri, relevant, judgements, fingerprint, graded)


def write_text_queries(queries: Queries, ids: list[str], uri: str, storage_options: dict | None = None) -> None:
    """BEIR queries as the embed job's Parquet input (id, text)."""
    fs, path = filesystem(uri, storage_options)
    fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(pa.table({"id": ids, "text": [queries.texts[i] for i in ids]}), f)
