"""Ray job entry point: top-k retrieval of queries against a corpus embedded by `mmembed embed`.

    python -m pipelines.search --queries URI (--corpus-embeddings URI | --index URI) --output URI --top-k K [--model M]

`mmembed search` runs this same code. Queries are either query embeddings written by
`mmembed embed --task query`, or raw query records (the embed job's input format) that this
job embeds first with --model, as `encode_query` would, into OUTPUT/_query_embeddings. The
search streams the corpus shards block by block on each actor (GPU when present); with --index
each actor loads the FAISS index of `mmembed index` instead (mmembed/stages/index_search.py). The output
(query_id, doc_id, score, rank) is a candidates dataset for `mmembed rerank --queries Q --corpus C`.
"""

from __future__ import annotations

import argparse
import logging
import time

from mmembed import __version__
from mmembed.manifest import MANIFEST_NAME, now_iso, read_json
from mmembed.options import UsageError, add_io_options, add_model_options, add_runtime_options, positive_int
from mmembed.storage import join_uri
from pipelines.rerank import (
    derive_args,
    finish,
    job_main,
    pool_remote_args,
    prepare_output,
    refuse_finished_output,
    run_record,
    start_cluster,
    write,
)

log = logging.getLogger("mmembed")

RESULT_COLUMNS = ["query_id", "doc_id", "score", "rank"]
QUERY_EMBEDDINGS = "_query_embeddings"
SIMILARITIES = ("cosine", "dot", "euclidean", "manhattan")


def build_parser(prog: str = "mmembed search") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Top-k retrieval. Exact: score every query against every corpus embedding with the model's "
        "similarity function (cosine, dot, euclidean or manhattan, from the corpus _manifest.json), streaming "
        "the corpus in blocks, on the GPU when there is one. Approximate, with --index: the top-k from a FAISS "
        "index built by `mmembed index`, same output.",
        epilog="Output: part-*.parquet (query_id, doc_id, score, rank; rank 1 = most similar), _errors/*.parquet "
        "(queries that could not be embedded) and _manifest.json. Rerank it with `mmembed rerank --candidates "
        "OUTPUT --queries QUERY_RECORDS --corpus CORPUS_RECORDS`. Exit codes: 0 ok, 2 bad usage (nothing ran), "
        "3 more errors than --max-error-fraction, 1 job failed.",
    )
    p.add_argument(
        "--queries",
        required=True,
        help="Query embeddings written by `mmembed embed --task query`, or query records in the embed job's input "
        "format (then --model is required).",
    )
    p.add_argument("--corpus-embeddings", default=None, help="Output directory of `mmembed embed` over the corpus "
                   "(required unless --index is given).")
    p.add_argument("--output", required=True, help="Output directory: local path or fsspec URI (e.g. s3://b/p).")
    p.add_argument("--top-k", type=positive_int, required=True, help="Documents kept per query.")
    add_model_options(p)
    model = next(a for a in p._actions if a.dest == "model")
    model.required = False
    model.help = (
        "Embed raw --queries with this model (the one that embedded the corpus; its query prompt/task applies, "
        "as in encode_query). Not needed when --queries are embeddings. " + model.help
    )
    g = p.add_argument_group("search")
    g.add_argument("--prompt-name", default=None, help="Query prompt name when embedding raw queries (default: the "
                   "model's `query` prompt, as encode_query).")
    g.add_argument("--prompt", default=None, help="A literal query prompt (wins over --prompt-name).")
    g.add_argument(
        "--query-batch-size",
        type=positive_int,
        default=1024,
        help="Queries each search actor scores per pass over the corpus (default: 1024). Larger batches read "
        "the corpus fewer times; the score block is this x --corpus-block-rows floats.",
    )
    g.add_argument(
        "--corpus-block-rows",
        type=positive_int,
        default=16_384,
        help="Corpus embeddings read and scored at a time (default: 16384).",
    )
    g.add_argument(
        "--rescore-multiplier",
        type=int,
        default=4,
        help="Quantised corpus (`mmembed embed --precision int8|uint8|binary|ubinary`) that also stores float "
        "vectors (--keep-float): the best N x --top-k hits by quantised score are rescored with the float query "
        "vectors and the corpus similarity, as ST's semantic_search_faiss/usearch rescore (default: 4; 0 "
        "keeps the quantised scores). Quantised scores: int8/uint8 the dot product of the quantised vectors, "
        "binary/ubinary minus the Hamming distance.",
    )
    g.add_argument("--overwrite", action="store_true", help="Replace a finished output at --output.")
    a = p.add_argument_group("approximate search (an index built by `mmembed index`)")
    a.add_argument("--index", default=None, help="Search this index (an `mmembed index` output) instead of "
                   "scanning --corpus-embeddings: same output layout, approximate top-k unless the index is flat. "
                   "Needs faiss-cpu (pip install \"mmembed[index]\"). Queries must come from the model that embedded "
                   "the indexed corpus (checked: name, revision, dim). With --corpus-embeddings too, the index must "
                   "have been built from exactly that output.")
    a.add_argument("--nprobe", type=positive_int, default=None, help="IVF lists scanned per query: more is slower "
                   "and closer to exact (default: the index's, see its _manifest.json).")
    a.add_argument("--ef-search", type=positive_int, default=None, help="HNSW candidate list per query: more is "
                   "slower and closer to exact (default: the index's).")
    add_runtime_options(p)
    add_io_options(p)
    return p


# --------------------------------------------------------------------------------------------
# Before Ray starts
# --------------------------------------------------------------------------------------------
def embed_manifest(uri: str, storage_options: dict) -> dict | None:
    """The manifest of a finished embed job at uri, or None (also when uri is a file, e.g. a query manifest)."""
    try:
        m = read_json(join_uri(uri, MANIFEST_NAME), storage_options)
    except (NotADirectoryError, IsADirectoryError):
        return None
    return m if m and m.get("job") == "embed" and m.get("status") == "complete" else None


def shard_uris(uri: str, manifest: dict, key: str = "files") -> list[str]:
    return [join_uri(uri, f["name"]) for f in manifest.get(key, [])]


def query_embed_args(args, corpus_model: dict):
    """The embed job's options for raw queries: encode_query, normalised as the corpus was."""
    from pipelines import embed

    argv = ["--input", args.queries, "--output", join_uri(args.output, QUERY_EMBEDDINGS), "--model", args.model,
            "--task", "query", "--overwrite"]
    if corpus_model.get("normalize_flag"):
        argv.append("--normalize")
    if corpus_model.get("truncate_dim"):
        argv += ["--truncate-dim", corpus_model["truncate_dim"]]
    ns = derive_args(embed.build_parser(), argv, args)
    embed.plan(ns)
    return ns


def plan(args) -> dict:
    from mmembed.outputs import check_output

    check_output("search", args.output, args.storage_options, overwrite=args.overwrite, inputs={
        "--queries": args.queries, "--corpus-embeddings": args.corpus_embeddings, "--index": args.index})
    if args.rescore_multiplier < 0:
        raise UsageError("--rescore-multiplier must be 0 (no rescoring) or more.")
    if args.index:
        from mmembed.index import index_as_corpus

        corpus = index_as_corpus(args.index, args.corpus_embeddings, args.storage_options, nprobe=args.nprobe,
                                 ef_search=args.ef_search)
    elif not args.corpus_embeddings:
        raise UsageError("pass --corpus-embeddings (exact search) or --index (approximate search).")
    elif args.nprobe or args.ef_search:
        raise UsageError("--nprobe and --ef-search tune an approximate search; pass --index too.")
    else:
        corpus = embed_manifest(args.corpus_embeddings, args.storage_options)
    if corpus is None:
        raise UsageError(
            f"--corpus-embeddings {args.corpus_embeddings} is not a finished `mmembed embed` output (no complete "
            "_manifest.json); embed the corpus first with `mmembed embed --task document`."
        )
    cmodel = corpus["model"]
    similarity = cmodel.get("similarity_fn_name") or "cosine"  # ST's default when a model names none
    if similarity not in SIMILARITIES:
        raise UsageError(f"corpus similarity {similarity!r} is not supported by search (supported: {SIMILARITIES}).")
    files = corpus.get("uris") or shard_uris(args.corpus_embeddings, corpus)
    if not files or not corpus["counts"].get("written"):
        raise UsageError(f"--corpus-embeddings {args.corpus_embeddings} holds no embeddings.")
    queries = embed_manifest(args.queries, args.storage_options)
    if queries is not None:
        if args.model:
            raise UsageError(f"--queries {args.queries} are already embeddings; drop --model.")
        qmodel = queries["model"]
        if (qmodel.get("name"), qmodel.get("revision")) != (cmodel.get("name"), cmodel.get("revision")):
            raise UsageError(
                f"query embeddings come from {qmodel.get('name')} @ {qmodel.get('revision')} but the corpus from "
                f"{cmodel.get('name')} @ {cmodel.get('revision')}; embed both with the same model."
            )
        embed_args = None
    elif not args.model:
        raise UsageError(
            f"--queries {args.queries} are not embeddings written by `mmembed embed` (no complete _manifest.json); "
            f"pass --model {cmodel.get('name')} to embed them as queries."
        )
    else:
        if args.model != cmodel.get("name"):
            raise UsageError(
                f"--model {args.model} differs from the model that embedded the corpus ({cmodel.get('name')}); "
                "query and corpus vectors must come from the same model."
            )
        embed_args = query_embed_args(args, cmodel)
        qmodel = cmodel
    if queries is not None and qmodel.get("quantization"):
        raise UsageError(
            f"--queries {args.queries} hold {qmodel.get('precision')} vectors; queries must be float (the search "
            "quantises them with the corpus ranges itself). Embed them without --precision, or pass raw queries."
        )
    if qmodel.get("dim") != cmodel.get("dim"):
        raise UsageError(f"query dim {qmodel.get('dim')} != corpus dim {cmodel.get('dim')}.")
    refuse_finished_output(args)
    return {
        "corpus": corpus,
        "corpus_files": files,
        "similarity": similarity,
        "dim": cmodel["dim"],
        "queries": queries,
        "embed_args": embed_args,
    }


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------
def compose(args, p: dict, res: dict, queries_uri: str, queries: dict):
    """query rows (embeddings and the query job's error rows) -> search, as a lazy Ray dataset."""
    from ray.data import ActorPoolStrategy

    from mmembed.stages.read_pairs import read_parquet
    from mmembed.stages.search import SearchStage, as_query_rows

    _, gpu = pool_remote_args(args, res)
    if args.index:
        from mmembed.stages.index_search import IndexSearchStage

        # FAISS on CPU: the actor takes the encoder's CPUs, never a GPU.
        stage, stage_args, gpu = IndexSearchStage, (args.index,), {"num_cpus": gpu["num_cpus"]}
        stage_kwargs = {"dim": p["dim"], "top_k": args.top_k, "storage_options": args.storage_options,
                        "nprobe": args.nprobe, "ef_search": args.ef_search}
    else:
        stage, stage_args, stage_kwargs = SearchStage, (p["corpus_files"],), {
            "dim": p["dim"],
            "top_k": args.top_k,
            "similarity_fn_name": p["similarity"],
            "storage_options": args.storage_options,
            "block_rows": args.corpus_block_rows,
            "device": res["device"],
            "quantization": p["corpus"]["model"].get("quantization"),
            "rescore_multiplier": args.rescore_multiplier,
        }
    parts = [shard_uris(queries_uri, queries), shard_uris(queries_uri, queries, "error_files")]
    datasets = [
        read_parquet(paths, queries_uri, args.storage_options).map_batches(as_query_rows, batch_format="pyarrow")
        for paths in parts
        if paths
    ]
    ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    return ds.map_batches(
        stage,
        fn_constructor_args=stage_args,
        fn_constructor_kwargs=stage_kwargs,
        batch_size=args.query_batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=res["num_encoders"]),
        max_restarts=-1,
        max_task_retries=-1,
        **gpu,
    )


def run(args) -> int:
    from pipelines import embed

    started, started_iso = time.time(), now_iso()
    p = plan(args)
    prepare_output(args, "search")
    queries_uri, queries = args.queries, p["queries"]
    if p["embed_args"] is not None:
        rc = embed.run(p["embed_args"])
        queries_uri = p["embed_args"].output
        queries = embed_manifest(queries_uri, args.storage_options)
        if queries is None:
            return rc or 1
    where, res, _ = start_cluster(args)
    totals = write(compose(args, p, res, queries_uri, queries), args, RESULT_COLUMNS)
    records = queries["counts"]["records"]
    per_query = min(args.top_k, p["corpus"]["counts"]["written"])
    manifest = {
        "status": "complete",
        "job": "search",
        "mmembed_version": __version__,
        "model": {**{k: p["corpus"]["model"].get(k) for k in ("name", "revision", "dim", "normalize")},
                  "similarity_fn_name": p["similarity"], "precision": p["corpus"]["model"].get("precision"),
                  "rescored": bool((p["corpus"]["model"].get("quantization") or {}).get("float_column")
                                   and args.rescore_multiplier)},
        "input": {
            "queries": args.queries,
            "query_embeddings": queries_uri,
            "corpus_embeddings": p["corpus"].get("source_uri", args.corpus_embeddings),
            "index": args.index and {"uri": args.index, "nprobe": args.nprobe, "ef_search": args.ef_search},
            "corpus_records": p["corpus"]["counts"]["written"],
            "records": records,
        },
        "output": {"uri": args.output, "top_k": args.top_k, "columns": RESULT_COLUMNS},
        "counts": {
            "records": records,
            "written": totals["written"],
            "errors": totals["errors"],
            "unaccounted": records - totals["errors"] - totals["written"] // max(per_query, 1),
        },
        **run_record(totals, {**res, "ray": where}, started, started_iso),
    }
    return finish("search", args, manifest, records, totals)


def main(argv: list[str] | None = None) -> int:
    return job_main("search", build_parser(), run, argv)


if __name__ == "__main__":
    from mmembed.options import exit_process

    exit_process(main())
