"""Entry point: top-k retrieval against a corpus embedded by `mmembed embed` (`mmembed search`).

    python -m pipelines.search --queries URI (--corpus-embeddings URI | --index URI) --output URI --top-k K [--model M]

The job itself is mmembed/jobs/search.py.
"""

from __future__ import annotations

import argparse

from mmembed.cli.options import add_io_options, add_model_options, add_runtime_options, job_main, positive_int


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
    add_model_options(p, required=False, purpose="Embed raw --queries with this model (the one that embedded the "
                      "corpus; its query prompt/task applies, as in encode_query). Not needed when --queries are "
                      "embeddings. ")
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
    a.add_argument("--candidate-tokens", type=positive_int, default=None, help="Multi-vector index: nearest token "
                   "vectors fetched per query token; their documents are scored with exact MaxSim (default: 128).")
    add_runtime_options(p)
    add_io_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from mmembed.jobs.config import SearchConfig, from_args
    from mmembed.jobs.runner import run
    from mmembed.jobs.search import SearchJob

    return job_main("search", build_parser(), lambda args: run(SearchJob(from_args(SearchConfig, args))), argv)


if __name__ == "__main__":
    from mmembed.cli.options import exit_process

    exit_process(main())
