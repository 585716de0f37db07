"""Entry point: retrieve, then rerank, over a whole corpus (`mmembed retrieve-rerank`).

    python -m pipelines.retrieve_rerank --queries Q --corpus C --embedder E --reranker R --output OUT

The job itself is mmembed/jobs/retrieve_rerank.py.
"""

from __future__ import annotations

import argparse

from mmembed.cli.options import add_io_options, add_runtime_options, job_main, positive_int


def build_parser(prog: str = "mmembed retrieve-rerank") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Retrieve the exact top --retrieve-k corpus records per query with an embedding model, then "
        "rerank them with a CrossEncoder and keep the best --top-k: embed + search + rerank on one Ray runtime.",
        epilog="Output: corpus_embeddings, candidates, reranked (each a complete job output with its own _manifest.json) and "
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


def main(argv: list[str] | None = None) -> int:
    from mmembed.jobs.config import RetrieveRerankConfig, from_args
    from mmembed.jobs.retrieve_rerank import RetrieveRerankJob
    from mmembed.jobs.runner import run

    return job_main("retrieve-rerank", build_parser(),
                    lambda args: run(RetrieveRerankJob(from_args(RetrieveRerankConfig, args))), argv)


if __name__ == "__main__":
    from mmembed.cli.options import exit_process

    exit_process(main())
