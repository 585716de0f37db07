"""Entry point: build an approximate nearest-neighbour index over corpus embeddings.

    python -m pipelines.index --embeddings URI --output URI [--kind ivf-flat|hnsw|ivf-pq|flat] [...]

`mmembed index` runs this same code. The build runs in this process (FAISS uses every core):
the quantizer is trained on a sample, then the store is added one shard at a time, so the
only full-corpus object in memory is the index itself. `mmembed search --index URI` uses it.
"""

from __future__ import annotations

import argparse
import sys
import time

from mmembed import __version__
from mmembed.manifest import command_line, library_versions, now_iso, redact_options, report
from mmembed.options import UsageError, add_storage_option, job_main, positive_int


def build_parser(prog: str = "mmembed index") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Build a FAISS approximate nearest-neighbour index from embeddings written by `mmembed embed` "
        "(or a reembed store's CURRENT). The metric follows the corpus _manifest.json: cosine and dot use inner "
        "product (unnormalised vectors are normalised for cosine), euclidean uses L2.",
        epilog="Output: index-*.faiss, ids-*.parquet (row -> id) and _manifest.json, written last. Search it with "
        "`mmembed search --index OUTPUT`. Needs faiss-cpu (pip install \"mmembed[index]\"). Exit codes: 0 ok, "
        "2 bad usage (nothing written), 1 failed.",
    )
    p.add_argument("--embeddings", required=True, help="An `mmembed embed` output, a reembed snapshot, or an "
                   "embedding store root (its CURRENT version is indexed).")
    p.add_argument("--output", required=True, help="Index directory: local path or fsspec URI (e.g. s3://b/idx).")
    g = p.add_argument_group("index (defaults depend on the corpus size N)")
    g.add_argument("--kind", choices=["flat", "ivf-flat", "hnsw", "ivf-pq"], default=None,
                   help="flat: exact scan; ivf-flat: k-means lists, exact vectors; hnsw: graph, no training; "
                   "ivf-pq: lists of product-quantized codes (smallest, approximate scores). Default: flat below "
                   "10,000 vectors, else ivf-flat.")
    g.add_argument("--nlist", type=positive_int, default=None,
                   help="IVF lists (default: sqrt(N) rounded to a power of two, at most N/39).")
    g.add_argument("--nprobe", type=positive_int, default=None,
                   help="IVF lists scanned per query, stored as the search default (default: nlist/16).")
    g.add_argument("--m", type=positive_int, default=None,
                   help="hnsw: links per node (default 32); ivf-pq: sub-quantizers, must divide dim (default: "
                   "the largest divisor of dim <= dim/8).")
    g.add_argument("--nbits", type=positive_int, default=8, help="ivf-pq: bits per code (default: 8).")
    g.add_argument("--ef-construction", type=positive_int, default=80, help="hnsw: build-time candidate list "
                   "(default: 80).")
    g.add_argument("--ef-search", type=positive_int, default=None, help="hnsw: search-time candidate list, stored "
                   "as the search default (default: 128).")
    g.add_argument("--train-size", type=positive_int, default=None, help="IVF: vectors sampled across all shards "
                   "to train the lists (default: 64 x nlist, at least 9,984 for ivf-pq).")
    g.add_argument("--overwrite", action="store_true", help="Replace a finished index at --output.")
    add_storage_option(p)
    return p


def plan(args) -> dict:
    """Every check before the build. Raises UsageError."""
    from mmembed.index import METRICS, EmbeddingSource, IndexOutput, IndexParams, require_faiss

    faiss = require_faiss()
    source = EmbeddingSource.open(args.embeddings, args.storage_options)
    if source.similarity not in METRICS:
        raise UsageError(
            f"the corpus similarity {source.similarity!r} has no FAISS metric (supported: {', '.join(METRICS)}); "
            "use exact `mmembed search --corpus-embeddings` instead."
        )
    out = IndexOutput(args.output, args.storage_options)
    existing = out.existing()
    if existing and not args.overwrite:
        raise UsageError(
            f"{args.output} already holds a finished run ({existing.get('job')}, {existing.get('finished_at')}). "
            "Choose another --output, or pass --overwrite to replace it."
        )
    params = IndexParams(
        kind=args.kind, nlist=args.nlist, nprobe=args.nprobe, m=args.m, nbits=args.nbits,
        ef_construction=args.ef_construction, ef_search=args.ef_search, train_size=args.train_size,
    ).resolve(source.count, source.dim)
    return {"faiss": faiss, "source": source, "output": out, "params": params}


def run(args) -> int:
    from mmembed.index import INDEX_JOB, IndexBuilder
    from mmembed.runstate import RunLock

    started, started_iso = time.time(), now_iso()
    p = plan(args)
    source = p["source"]
    with RunLock(args.output, args.storage_options):
        builder = IndexBuilder(source, p["params"])
        index, ids = builder.build()
        built = time.time()
        manifest = {
            "job": INDEX_JOB,
            "mmembed_version": __version__,
            "source": {
                "uri": source.uri,
                "root": source.root,
                "job": source.manifest.get("job"),
                "finished_at": source.manifest.get("finished_at"),
                "fingerprint": source.fingerprint(),
                "files": [{"name": f["name"], "rows": f["rows"]} for f in source.files],
            },
            "model": {
                **{k: source.model.get(k) for k in ("name", "revision", "dim", "normalize", "task", "truncate_dim")},
                # What `search` needs to embed raw queries as the corpus was (reembed records one flag).
                "normalize_flag": source.model.get("normalize_flag", source.model.get("normalize")),
            },
            "similarity_fn_name": source.similarity,
            "metric": builder.metric,
            "normalize_inputs": builder.normalize,
            "index": builder.params.to_dict(),
            "counts": {"records": source.count, "written": int(index.ntotal), "errors": 0,
                       "unaccounted": source.count - int(index.ntotal)},
            "output": {"uri": args.output, "storage_options": redact_options(args.storage_options)},
            "versions": {**library_versions(), "faiss": p["faiss"].__version__},
            "started_at": started_iso,
            "build_s": round(built - started, 3),
        }
        manifest["finished_at"] = now_iso()
        manifest["duration_s"] = round(time.time() - started, 3)
        manifest["command_line"] = command_line()
        manifest = p["output"].commit(index, ids, manifest)
    print(report("mmembed index", manifest, args.output), flush=True)
    print(f"  index    {manifest['index']}  metric={manifest['metric']}", flush=True)
    return 0 if manifest["counts"]["unaccounted"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    return job_main("index", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
