"""Ray job entry point: retrieve, then rerank, over a whole corpus.

    python -m pipelines.retrieve_rerank --queries Q --corpus C --embedder E --reranker R --output OUT

`mmembed retrieve-rerank` runs this same code: three jobs on one Ray runtime, each writing its
own output and manifest under OUT,
  1. OUT/corpus_embeddings: `mmembed embed --task document` of the corpus with the embedder
     (skipped when --corpus-embeddings points at an existing one),
  2. OUT/candidates: `mmembed search` of the raw queries (embedded as encode_query would),
     the exact top --retrieve-k per query,
  3. OUT/reranked: `mmembed rerank` of those candidates with the reranker, queries and
     documents looked up by id in --queries and --corpus, keeping the best --top-k,
and OUT/_manifest.json tying them together. The reranker and the embedder are checked before
anything runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from mmembed import __version__
from mmembed.manifest import MANIFEST_NAME, command_line, now_iso, read_json, write_json
from mmembed.options import add_io_options, add_runtime_options, positive_int
from mmembed.storage import join_uri
from pipelines import embed, rerank, search
from pipelines.embed import EXIT_OK

log = logging.getLogger("mmembed")

STEPS = ("corpus_embeddings", "candidates", "reranked")


def build_parser(prog: str = "mmembed retrieve-rerank") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Retrieve the exact top --retrieve-k corpus records per query with an embedding model, then "
        "rerank them with a CrossEncoder and keep the best --top-k: embed + search + rerank on one Ray runtime.",
        epilog=f"Output: {', '.join(STEPS)} (each a complete job output with its own _manifest.json) and "
        "_manifest.json. The final ranking is OUTPUT/reranked/part-*.parquet (query_id, doc_id, score, rank). "
        "For per-step options (prompts, model kwargs, batch budgets) run mmembed embed, search and rerank "
        "yourself. Exit codes: 0 ok, 2 bad usage (nothing ran), 3 more errors than --max-error-fraction in a "
        "step, 1 job failed.",
    )
    p.add_argument("--queries", required=True, help="Query records in the embed job's input format (with `id`).")
    p.add_argument("--corpus", required=True, help="Corpus records in the embed job's input format (with `id`).")
    p.add_argument("--output", required=True, help="Output directory: local path or fsspec URI (e.g. s3://b/p).")
    g = p.add_argument_group("models")
    g.add_argument("--embedder", required=True, help="SentenceTransformer for retrieval: hub name or local directory.")
    g.add_argument("--reranker", required=True, help="CrossEncoder for reranking: hub name or local directory.")
    g.add_argument("--trust-remote-code", action="store_true", help="Allow both models to run their own code.")
    g = p.add_argument_group("retrieve and rerank")
    g.add_argument(
        "--corpus-embeddings",
        default=None,
        help="An existing `mmembed embed` output of --corpus with --embedder; skips step 1.",
    )
    g.add_argument("--retrieve-k", type=positive_int, default=50, help="Candidates retrieved per query (default: 50).")
    g.add_argument("--top-k", type=positive_int, default=10, help="Reranked results kept per query (default: 10).")
    g.add_argument("--overwrite", action="store_true", help="Replace a finished output at --output.")
    add_runtime_options(p)
    add_io_options(p)
    return p


def plan(args) -> dict:
    """The three steps' options, checked as far as possible before anything runs."""
    out = {step: join_uri(args.output, step) for step in STEPS}
    from mmembed.outputs import check_output

    check_output("retrieve-rerank", args.output, args.storage_options, overwrite=args.overwrite, inputs={
        "--queries": args.queries, "--corpus": args.corpus, "--corpus-embeddings": args.corpus_embeddings})
    rerank.refuse_finished_output(args)
    trust = ["--trust-remote-code"] if args.trust_remote_code else []
    steps = {}
    corpus_embeddings = args.corpus_embeddings or out["corpus_embeddings"]
    if not args.corpus_embeddings:
        steps["corpus_embeddings"] = rerank.derive_args(
            embed.build_parser(),
            ["--input", args.corpus, "--output", corpus_embeddings, "--model", args.embedder, "--task", "document",
             "--overwrite", *trust],
            args,
        )
        embed.plan(steps["corpus_embeddings"])
    steps["candidates"] = rerank.derive_args(
        search.build_parser(),
        ["--queries", args.queries, "--corpus-embeddings", corpus_embeddings, "--output", out["candidates"],
         "--top-k", args.retrieve_k, "--model", args.embedder, "--overwrite", *trust],
        args,
    )
    steps["reranked"] = rerank.derive_args(
        rerank.build_parser(),
        ["--candidates", out["candidates"], "--queries", args.queries, "--corpus", args.corpus, "--output",
         out["reranked"], "--model", args.reranker, "--top-k", args.top_k, "--overwrite", *trust],
        args,
    )
    rerank.load_reranker(steps["reranked"])
    for flag, uri in (("--queries", args.queries), ("--corpus", args.corpus)):
        rerank.resolve_manifest(uri, flag, args.storage_options)
    return {"steps": steps, "outputs": {**out, "corpus_embeddings": corpus_embeddings}}


def run(args) -> int:
    started, started_iso = time.time(), now_iso()
    p = plan(args)
    rerank.prepare_output(args, "retrieve-rerank")
    jobs = {"corpus_embeddings": embed, "candidates": search, "reranked": rerank}
    codes = {}
    for step, ns in p["steps"].items():
        print(f"\nmmembed retrieve-rerank: step {step}", flush=True)
        codes[step] = jobs[step].run(ns)
        if codes[step] != EXIT_OK:
            print(f"mmembed retrieve-rerank: step {step} exited with {codes[step]}; stopping", file=sys.stderr)
            return codes[step]
    final = read_json(join_uri(p["outputs"]["reranked"], MANIFEST_NAME), args.storage_options) or {}
    manifest = {
        "status": "complete",
        "job": "retrieve-rerank",
        "mmembed_version": __version__,
        "models": {"embedder": args.embedder, "reranker": args.reranker},
        "input": {"queries": args.queries, "corpus": args.corpus},
        "outputs": p["outputs"],
        "retrieve_k": args.retrieve_k,
        "top_k": args.top_k,
        "counts": final.get("counts", {}),
        "started_at": started_iso,
        "finished_at": now_iso(),
        "duration_s": round(time.time() - started, 3),
        "command_line": command_line(),
    }
    write_json(join_uri(args.output, MANIFEST_NAME), manifest, args.storage_options)
    print(f"\nmmembed retrieve-rerank: complete in {manifest['duration_s']:.1f} s -> {p['outputs']['reranked']}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return rerank.job_main("retrieve-rerank", build_parser(), run, argv)


if __name__ == "__main__":
    from mmembed.options import exit_process

    exit_process(main())
