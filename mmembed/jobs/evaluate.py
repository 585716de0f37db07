"""`mmembed evaluate`: the retrieval quality of a store version (or of any embed output) on the user's
own queries and relevance judgements.

    judgements   --queries and --qrels read and checked (mmembed/inputs/judgements.py), before a model loads
    search       the search job, exact top-max(k) with the version's similarity, streamed over the
                 snapshot's shards; it embeds the queries as encode_query would, with the model and
                 settings recorded for the version (not re-typed by the user)
    metrics      ST's InformationRetrievalEvaluator.compute_metrics on the retrieved lists: accuracy,
                 precision, recall, MRR, NDCG and MAP @ each k, keyed as ST keys them (`ndcg@10`)
    record       <snapshot>/_eval/<key>.json, keyed by the queries' and qrels' fingerprints and the k's:
                 the same evaluation is read back, not computed again (--recompute forces it)

The query embeddings and top-k lists are written to a work folder (ROOT/_work/ for a store, a local
temporary directory for an embed output, or --work-dir) and removed afterwards. The driver holds the
judgements and the top-k lists, never the corpus.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

from mmembed.errors import JobError, UsageError
from mmembed.inputs.judgements import Qrels, Queries, read_qrels, read_queries, write_text_queries
from mmembed.jobs.config import EvaluateConfig, SearchConfig, derive
from mmembed.outputs.manifest import MANIFEST_NAME, now_iso, read_json, write_json
from mmembed.storage.fs import filesystem, join_uri, protocol_of
from mmembed.stores.store import EVAL_DIR, STORE_MARKER, Snapshot, Store, StoreError

DEFAULT_K = (1, 3, 5, 10, 100)
METRICS = ("accuracy", "precision", "recall", "mrr", "ndcg", "map")  # ST's names, in its order
EVAL_FORMAT = 1  # bumped when a record's meaning changes, so older records are not reused


@dataclass
class Target:
    uri: str  # the snapshot or embed output folder
    label: str
    manifest: dict
    model: dict  # the settings the queries are embedded with
    store: Store | None = None
    snapshot: Snapshot | None = None


def snapshot_target(store: Store, snap: Snapshot) -> Target:
    """A committed snapshot, its queries embedded with its version's recorded model and settings."""
    info = store.version_info(snap.slug, snap.version) or {}
    model = {**snap.manifest.get("model", {}), **info.get("settings", {})}
    return Target(store.uri(snap.slug, snap.version, snap.snapshot), f"{snap.slug}/{snap.version} @ {snap.snapshot}",
                  snap.manifest, model, store, snap)


def resolve_target(root: str, version: str | None, snapshot: str | None, storage_options: dict) -> Target:
    """A store's version (CURRENT by default; its latest snapshot, or --snapshot) or an embed output."""
    from mmembed.jobs.search import embed_manifest

    try:
        is_store = read_json(join_uri(root, STORE_MARKER), storage_options) is not None
    except (NotADirectoryError, IsADirectoryError):
        is_store = False
    if is_store:
        store = Store(root, storage_options)
        if version:
            slug, ver = store.resolve(version)
            snap = store.snapshot(slug, ver, snapshot) if snapshot else store.latest(slug, ver)
            if snap is None:
                names = ", ".join(s.snapshot for s in store.snapshots(slug, ver)) or "none"
                raise StoreError(f"no committed snapshot {snapshot!r} in {slug}/{ver}; committed: {names}")
        else:
            if snapshot:
                raise UsageError("--snapshot needs --version")
            snap = store.current_snapshot()
            if snap is None:
                raise StoreError(f"store {root} has no CURRENT version yet; name one with --version")
        return snapshot_target(store, snap)
    if version or snapshot:
        raise UsageError(f"--version and --snapshot name a version of a store; {root} is not an mmembed store")
    manifest = embed_manifest(root, storage_options)
    if manifest is None:
        raise UsageError(f"{root} is neither an mmembed store (no _mmembed_store.json) nor a finished `mmembed "
                         "embed` output (no complete _manifest.json)")
    return Target(root.rstrip("/"), root, manifest, manifest["model"])


def k_list(text: str) -> tuple[int, ...]:
    import argparse

    try:
        ks = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers, e.g. 1,3,5,10,100") from None
    if not ks or ks[0] <= 0:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers, e.g. 1,3,5,10,100")
    return ks


def check_metric(metric: str, ks: tuple[int, ...]) -> tuple[int, ...]:
    """The k's to evaluate so that `metric` (e.g. ndcg@10) is among the results; refuses unknown names."""
    name, _, k = metric.partition("@")
    if name not in METRICS or not k.isdigit() or int(k) <= 0:
        raise UsageError(f"--metric {metric!r}: expected <name>@<k> with name one of {', '.join(METRICS)}, "
                         "e.g. ndcg@10")
    return tuple(sorted({*ks, int(k)}))


def check_judgements(queries_uri: str, qrels_uri: str, storage_options: dict) -> tuple[Queries, Qrels]:
    queries = read_queries(queries_uri, storage_options)
    return queries, read_qrels(qrels_uri, queries, storage_options)


def evaluation_key(queries: Queries, qrels: Qrels, ks: tuple[int, ...]) -> str:
    payload = json.dumps({"format": EVAL_FORMAT, "queries": queries.fingerprint, "qrels": qrels.fingerprint,
                          "k": list(ks)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def st_metrics(qrels: Qrels, query_ids: list[str], hits, ks: tuple[int, ...],
               chunk: int = 2048) -> tuple[dict, int]:
    """ST's own computation on the retrieved lists, flattened as ST keys its metrics (`ndcg@10`), and the
    number of queries it scored (those with a relevant judgement, as ST's evaluator keeps them).

    `hits` is an Arrow table (query_id, doc_id, score). ST's compute_metrics wants a dict per hit; for 10,000
    queries x 100 hits that is a gigabyte of Python objects, so it is called on `chunk` queries at a time and
    each metric, a mean over queries, is recombined weighted by the chunk's queries (equal to one call up to
    float rounding: tests/test_evaluate.py)."""
    import numpy as np
    import pyarrow.compute as pc
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    ks = list(ks)
    scored = [q for q in query_ids if q in qrels.relevant]
    enc = pc.dictionary_encode(hits.column("query_id")).combine_chunks()
    where = {name: i for i, name in enumerate(enc.dictionary.to_pylist())}
    codes = enc.indices.to_numpy(zero_copy_only=False)
    order = np.argsort(codes, kind="stable")  # each query's rows together, in the order they were written
    bounds = np.searchsorted(codes[order], np.arange(len(where) + 1))
    docs, scores = hits.column("doc_id"), hits.column("score")
    sums: dict[str, float] = {}
    for start in range(0, len(scored), chunk):
        part = scored[start:start + chunk]
        lists = []
        for q in part:
            c = where.get(q)
            rows = order[bounds[c]:bounds[c + 1]] if c is not None else order[:0]
            lists.append([{"corpus_id": d, "score": v} for d, v in
                          zip(docs.take(rows).to_pylist(), scores.take(rows).to_pylist())])
        # The corpus is never handed over: compute_metrics reads only the lists, the judgements and query ids.
        ev = InformationRetrievalEvaluator(
            {q: q for q in part}, {}, {q: qrels.relevant[q] for q in part}, mrr_at_k=ks, ndcg_at_k=ks,
            accuracy_at_k=ks, precision_recall_at_k=ks, map_at_k=ks, write_csv=False)
        result = ev.compute_metrics(lists)
        for name in METRICS:
            for k in ks:
                key = f"{name}@{k}"
                sums[key] = sums.get(key, 0.0) + float(result[f"{name}@k"][k]) * len(part)
    return {key: total / len(scored) for key, total in sums.items()}, len(scored)


def missing_corpus_ids(target: Target, qrels: Qrels, storage_options: dict) -> int:
    """Relevant judged pairs whose document has no embedding in the target (scored as misses, as ST
    scores them), streaming the shards' id column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from mmembed.jobs.search import shard_uris
    from mmembed.stages.read_pairs import read_parquet_local

    wanted = pa.array(sorted(qrels.corpus_ids()), pa.string())
    found: set[str] = set()
    for t in read_parquet_local(shard_uris(target.uri, target.manifest), storage_options, ["id"], batch_rows=65_536):
        ids = t.column(0).combine_chunks().cast(pa.string())
        found.update(ids.filter(pc.is_in(ids, value_set=wanted)).to_pylist())
    return sum(1 for docs in qrels.relevant.values() for c in docs if c not in found)


def work_dir(cfg: EvaluateConfig, target: Target) -> tuple[str, str | None]:
    """(folder, what else to remove if empty afterwards): where the query embeddings and top-k lists go."""
    token = f"evaluate-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    if cfg.work_dir:
        return join_uri(cfg.work_dir, token), None  # the user's folder stays, whatever it holds
    if target.store is not None:
        return target.store.uri("_work", token), target.store.uri("_work")
    return tempfile.mkdtemp(prefix="mmembed-evaluate-"), None


def search_config(cfg: EvaluateConfig, target: Target, queries_uri: str, out: str, top_k: int,
                  n_queries: int) -> SearchConfig:
    """The search job that embeds the queries with the target's recorded model and settings."""
    m = target.model
    revision = m.get("revision")
    # One pass over the corpus for up to 8,192 queries; the score block stays at 2^25 floats (128 MiB).
    qb = cfg.query_batch_size or min(max(n_queries, 1), 8192)
    rows = cfg.corpus_block_rows or max(1024, 2**25 // qb)
    return derive(
        SearchConfig, cfg, queries=queries_uri, output=out, top_k=top_k, corpus_embeddings=target.uri,
        model=m.get("name") or m.get("model"),
        revision=None if not revision or str(revision).startswith("local-") else revision,
        model_kwargs=m.get("model_kwargs") or {}, processor_kwargs=m.get("processor_kwargs") or {},
        transport_dtype=m.get("transport_dtype"), query_batch_size=qb, corpus_block_rows=rows, overwrite=False)


def check_model_unchanged(target: Target, scfg: SearchConfig) -> None:
    """A local model directory rebuilt since the version was embedded would embed queries differently."""
    from mmembed.models.loading import model_revision

    recorded = target.model.get("revision")
    if recorded and str(recorded).startswith("local-"):
        now = model_revision(scfg.model_spec())
        if now != recorded:
            raise UsageError(f"the model at {scfg.model} has changed since {target.label} was embedded (revision "
                             f"{recorded}, now {now}); its queries would not match its corpus. Re-embed first.")


def run_search(scfg: SearchConfig) -> dict:
    """Run the search job quietly (its report is shown when it fails); its manifest."""
    from mmembed.jobs.runner import run
    from mmembed.jobs.search import SearchJob

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run(SearchJob(scfg))
    manifest = read_json(join_uri(scfg.output, MANIFEST_NAME), scfg.storage_options)
    if code != 0 or manifest is None:
        raise JobError(f"the search for the evaluation failed (exit {code}):\n{out.getvalue()[-4000:]}")
    return manifest


def read_hits(search_out: str, manifest: dict, storage_options: dict):
    """(query_id, doc_id, score) rows of the search output as one Arrow table, and the ids of the queries
    that failed (error rows: no doc_id)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from mmembed.jobs.search import shard_uris
    from mmembed.stages.read_pairs import read_parquet_local

    cols = ["query_id", "doc_id", "score"]
    schema = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("score", pa.float64())])
    tables = [t.cast(schema) for t in read_parquet_local(shard_uris(search_out, manifest), storage_options, cols,
                                                         batch_rows=65_536)]
    for t in read_parquet_local(shard_uris(search_out, manifest, "error_files"), storage_options):
        # An error shard: the queries that could not be embedded.
        qcol = t.column("query_id" if "query_id" in t.column_names else "id")
        tables.append(pa.table({"query_id": qcol, "doc_id": pa.nulls(t.num_rows, pa.string()),
                                "score": pa.nulls(t.num_rows, pa.float64())}).cast(schema))
    t = pa.concat_tables(tables) if tables else schema.empty_table()
    ok = pc.is_valid(t.column("doc_id"))
    failed = sorted(set(t.filter(pc.invert(ok)).column("query_id").to_pylist()))
    return t.filter(ok), failed


def evaluate(cfg: EvaluateConfig, target: Target, queries: Queries, qrels: Qrels, ks: tuple[int, ...],
             *, say=print) -> dict:
    """The evaluation record of `target`: read back from its _eval/ folder, or computed and written there."""
    so = dict(cfg.storage_options)
    key = evaluation_key(queries, qrels, ks)
    record_uri = join_uri(target.uri, f"{EVAL_DIR}/{key}.json")
    if not cfg.recompute:
        recorded = read_json(record_uri, so)
        if recorded and recorded.get("format") == EVAL_FORMAT:
            say(f"  {target.label}: recorded evaluation of {recorded['evaluated_at']} (same queries and qrels; "
                "--recompute to run it again)")
            return recorded
    started = time.time()
    judged = [q for q in queries.ids if q in qrels.relevant]
    embedded = len(judged) if queries.kind == "jsonl" else len(queries.ids)  # Parquet queries are read whole
    work, tidy = work_dir(cfg, target)
    fs, work_path = filesystem(work, so)
    try:
        if queries.kind == "jsonl":
            queries_uri = join_uri(work, "queries.parquet")
            write_text_queries(queries, judged, queries_uri, so)  # only judged queries count in ST's metrics
        else:
            queries_uri = queries.uri
        top_k = max(ks)
        scfg = search_config(cfg, target, queries_uri, join_uri(work, "search"), top_k, embedded)
        check_model_unchanged(target, scfg)
        say(f"  {target.label}: embedding {embedded:,} queries "
            f"with {scfg.model} and searching the top {top_k} ...")
        manifest = run_search(scfg)
        hits, failed = read_hits(scfg.output, manifest, so)
    finally:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(work_path, recursive=True)
        if tidy and protocol_of(tidy) == "file":  # object stores have no empty folders to leave behind
            with contextlib.suppress(OSError):
                fs.rmdir(filesystem(tidy, so)[1])  # ROOT/_work, when no other evaluation is using it
    metrics, scored = st_metrics(qrels, queries.ids, hits, ks)
    record = {
        "format": EVAL_FORMAT,
        "key": key,
        "target": {"uri": target.uri, "label": target.label,
                   **({"version": f"{target.snapshot.slug}/{target.snapshot.version}",
                       "snapshot": target.snapshot.snapshot} if target.snapshot else {})},
        "model": {k: target.model.get(k) for k in ("name", "model", "revision", "dim", "task", "truncate_dim",
                                                   "precision") if k in target.model},
        "similarity_fn_name": manifest["model"]["similarity_fn_name"],
        "queries": {"uri": queries.uri, "fingerprint": queries.fingerprint, "count": len(queries.ids),
                    "scored": scored, "failed": sorted(set(failed))[:20], "failed_count": len(set(failed))},
        "qrels": {"uri": qrels.uri, "fingerprint": qrels.fingerprint, "judgements": qrels.judgements,
                  "relevant": qrels.relevant_pairs},
        "corpus": {"records": target.manifest.get("counts", {}).get("written"),
                   "relevant_not_in_corpus": missing_corpus_ids(target, qrels, so)},
        "k": list(ks),
        "metrics": metrics,
        "evaluated_at": now_iso(),
        "duration_s": round(time.time() - started, 3),
    }
    fs_r, path_r = filesystem(record_uri, so)
    fs_r.makedirs(fs_r._parent(path_r), exist_ok=True)
    write_json(record_uri, record, so)
    return record


def table(record: dict) -> str:
    ks = record["k"]
    q, c = record["queries"], record["corpus"]
    lines = [
        f"{record['target']['label']}: {q['scored']:,} queries scored, {record['qrels']['relevant']:,} relevant "
        f"judgements, {record['similarity_fn_name']} similarity over {c['records'] or 0:,} documents",
        "           " + "".join(f"{'@' + str(k):>9}" for k in ks),
    ]
    for name in METRICS:
        lines.append(f"  {name:<9}" + "".join(f"{record['metrics'][f'{name}@{k}']:>9.4f}" for k in ks))
    if c["relevant_not_in_corpus"]:
        lines.append(f"  {c['relevant_not_in_corpus']:,} relevant judged document(s) are not in the corpus "
                     "embeddings (no vector, or an error row): scored as misses, as ST scores them")
    if q["failed_count"]:
        lines.append(f"  {q['failed_count']:,} queries could not be embedded (e.g. {', '.join(q['failed'][:3])}): "
                     "they retrieve nothing and count as misses")
    unscored = q["count"] - q["scored"]
    if unscored:
        lines.append(f"  {unscored:,} queries have no relevant judgement and are not scored (as in ST)")
    return "\n".join(lines)


def main(cfg: EvaluateConfig) -> int:
    so = dict(cfg.storage_options)
    target = resolve_target(cfg.root, cfg.version, cfg.snapshot, so)
    queries, qrels = check_judgements(cfg.queries, cfg.qrels, so)
    record = evaluate(cfg, target, queries, qrels, tuple(cfg.k))
    print(table(record))
    if cfg.json:
        fs, path = filesystem(cfg.json, so)
        with fs.open(path, "w") as f:
            json.dump(record["metrics"], f, indent=2)
        print(f"  metrics -> {cfg.json}", file=sys.stderr)
    return 0
