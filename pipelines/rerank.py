"""Entry point: rerank candidate (query, document) pairs with a CrossEncoder (`mmembed rerank`).

    python -m pipelines.rerank --candidates URI --output URI --model NAME_OR_PATH [--corpus URI] [--top-k K]

The job itself is mmembed/jobs/rerank.py.
"""

from __future__ import annotations

import argparse

from mmembed.cli.options import (
    add_io_options,
    add_model_options,
    add_on_unsupported_option,
    add_runtime_options,
    job_main,
    positive_int,
)


def build_parser(prog: str = "mmembed rerank") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Score and rank candidate (query, document) pairs with a sentence-transformers CrossEncoder "
        "(BERT-style cross-encoders, Qwen3-VL rerankers), on Ray. Scores equal CrossEncoder.predict and ranks "
        "equal CrossEncoder.rank on the same pairs.",
        epilog="Candidates: Parquet (file, directory or glob) with query_id, query, doc_id and doc. A query/doc "
        "cell is text, a media URI or path (a string ending in a media extension, without spaces unless "
        "absolute: images, audio, video), raw image bytes, an audio struct {array, sampling_rate}, or a struct "
        "{text, image, audio, video} for multimodal records (its audio may be such a struct, its image/video "
        "bytes). Chat messages: a `messages` column holds a pair as one conversation, as CrossEncoder.predict "
        "takes it: a list of {role, content} with roles `query` and `document` (and `system` for an "
        "instruction), content a string or a list of {type, text|image|audio|video} parts; such rows need no "
        "query/doc cells (CrossEncoder has no form for messages as one side of a pair, so a list-typed "
        "query/doc column, or a --corpus record with `messages`, is refused). A modality the reranker cannot "
        "take is refused before Ray starts (see --on-unsupported). Other "
        "columns (e.g. the retrieval score of `mmembed search`) are ignored. Output: part-*.parquet "
        "(query_id, doc_id, score, rank; rank 1 = best in its query), _errors/*.parquet (id = JSON "
        "[query_id, doc_id], stage, error) and _manifest.json. Exit codes: 0 ok, 2 bad usage (nothing ran), "
        "3 more errors than --max-error-fraction, 1 job failed.",
    )
    p.add_argument("--candidates", required=True, help="Candidates dataset: local path or fsspec URI.")
    p.add_argument("--output", required=True, help="Output directory: local path or fsspec URI (e.g. s3://b/p).")
    g = p.add_argument_group("resolving records by id")
    g.add_argument(
        "--corpus",
        default=None,
        help="A corpus in the embed job's input format (Parquet manifest with `id`, or a media directory); "
        "documents are looked up by doc_id and the candidates' `doc` column may be absent (it is ignored). "
        "A doc_id missing from the corpus becomes an error row.",
    )
    g.add_argument(
        "--queries",
        default=None,
        help="Likewise for queries, looked up by query_id (e.g. the query manifest given to `mmembed search`).",
    )
    add_model_options(p)
    g = p.add_argument_group("ranking (as in CrossEncoder.rank)")
    add_on_unsupported_option(g, "score", "pairs")
    g.add_argument("--top-k", type=positive_int, default=None, help="Keep the best K documents per query (default: all).")
    g.add_argument("--prompt-name", default=None, help="A key of the reranker's `prompts` (its instruction).")
    g.add_argument("--prompt", default=None, help="A literal prompt/instruction (wins over --prompt-name).")
    g.add_argument("--overwrite", action="store_true", help="Replace a finished output at --output.")
    g.add_argument(
        "--shuffle-partitions",
        type=positive_int,
        default=None,
        help="Hash partitions for grouping by query (and for id lookups); default: the cluster's CPU count.",
    )
    add_runtime_options(p)
    add_io_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from mmembed.jobs.config import RerankConfig, from_args
    from mmembed.jobs.rerank import RerankJob
    from mmembed.jobs.runner import run

    return job_main("rerank", build_parser(), lambda args: run(RerankJob(from_args(RerankConfig, args))), argv)


if __name__ == "__main__":
    from mmembed.cli.options import exit_process

    exit_process(main())
