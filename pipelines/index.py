"""Entry point: build an approximate nearest-neighbour index over corpus embeddings (`mmembed index`).

    python -m pipelines.index --embeddings URI --output URI [--kind ivf-flat|hnsw|ivf-pq|flat] [...]

The job itself is mmembed/jobs/index.py.
"""

from __future__ import annotations

import argparse

from mmembed.cli.options import add_storage_option, job_main, positive_int


def build_parser(prog: str = "mmembed index") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Build a FAISS approximate nearest-neighbour index from embeddings written by `mmembed embed` "
        "(or a reembed store's CURRENT). The metric follows the corpus _manifest.json: cosine and dot use inner "
        "product (unnormalised vectors are normalised for cosine), euclidean uses L2 (manhattan has no FAISS metric: "
        "use exact search). A multi-vector corpus (ColBERT, ColPali, ColQwen2) gets a token index: every token vector "
        "indexed (default ivf-sq8 with about 4 x sqrt(vectors) lists, nlist/128 probed) and the vectors kept in "
        "document order beside it, so `search --index` ranks candidate documents by exact MaxSim. A quantised corpus (`embed --precision int8|uint8|binary|ubinary`) is indexed from the "
        "float vectors that --keep-float stored; without them it is refused. The build runs in this process, no "
        "Ray: the lists are trained on a sample, then the corpus is added shard by shard.",
        epilog="Output: index-*.faiss, ids-*.parquet (row -> id) and _manifest.json, written last. Search it with "
        "`mmembed search --index OUTPUT`. The whole index is held in memory while it is built and by each search "
        "actor (flat, ivf-flat, hnsw: about N x dim x 4 bytes; ivf-sq8 a quarter of that). Needs faiss-cpu (pip install \"mmembed[index]\"). Exit codes: 0 ok, "
        "2 bad usage (nothing written), 1 failed.",
    )
    p.add_argument("--embeddings", required=True, help="An `mmembed embed` output, a reembed snapshot, or an "
                   "embedding store root (its CURRENT version is indexed).")
    p.add_argument("--output", required=True, help="Index directory: local path or fsspec URI (e.g. s3://b/idx).")
    g = p.add_argument_group(
        "index (defaults depend on the corpus size N)",
        "Defaults: N < 10,000: flat (an exact scan is already instant there). N >= 10,000: ivf-flat with "
        "nlist = sqrt(N) rounded to a power of two (at most N/39), nprobe = nlist/16, trained on 64 x nlist "
        "vectors; e.g. N = 100,000: nlist 256, nprobe 16; N = 1,000,000: nlist 1024, nprobe 64. Every default "
        "and the FAISS version are recorded in the index _manifest.json. benchmarks/RESULTS.md (\"Approximate search at 1M\") has the "
        "measured recall and speed of each kind.",
    )
    g.add_argument("--kind", choices=["flat", "ivf-flat", "ivf-sq8", "hnsw", "ivf-pq"], default=None,
                   help="flat: exact scan of every vector (results equal `mmembed search`); ivf-flat: k-means "
                   "lists, only --nprobe lists are scanned, exact vectors and scores; ivf-sq8: the same lists "
                   "holding 8-bit scalar-quantised vectors (4x smaller, approximate scores); hnsw: a graph, no "
                   "training, fast queries but the slowest build and ~1.2x the vectors in memory; ivf-pq: lists of "
                   "product-quantised codes (smallest, coarsest scores). Default: flat below 10,000 vectors, else "
                   "ivf-flat (also when an IVF option is given).")
    g.add_argument("--nlist", type=positive_int, default=None,
                   help="IVF kinds: number of k-means lists (default: sqrt(N) rounded to a power of two, at most "
                   "N/39, so that each list has FAISS's minimum of 39 training vectors).")
    g.add_argument("--nprobe", type=positive_int, default=None,
                   help="IVF kinds: lists scanned per query, stored as the default of `search --index` (which can "
                   "override it); nprobe = nlist scans everything and equals exact search (default: nlist/16).")
    g.add_argument("--m", type=positive_int, default=None,
                   help="hnsw: links per node (default: 32); ivf-pq: sub-quantizers, must divide the dim (default: "
                   "the largest divisor of dim <= dim/8).")
    g.add_argument("--nbits", type=positive_int, default=None, help="ivf-pq: bits per sub-quantizer code "
                   "(default: 8).")
    g.add_argument("--ef-construction", type=positive_int, default=None, help="hnsw: candidate list while "
                   "building; more is a better graph and a slower build (default: 80).")
    g.add_argument("--ef-search", type=positive_int, default=None, help="hnsw: candidate list per query, stored "
                   "as the default of `search --index` (which can override it); more is slower and closer to "
                   "exact (default: 128).")
    g.add_argument("--train-size", type=positive_int, default=None, help="IVF kinds: vectors sampled uniformly "
                   "across all shards to train the lists (default: 64 x nlist, at least 9,984 for ivf-pq; at most "
                   "N).")
    g.add_argument("--overwrite", action="store_true", help="Replace a finished index at --output: the new build's "
                   "files are written under new names and become the index when its _manifest.json is written; "
                   "the previous build's files are removed after that.")
    add_storage_option(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from mmembed.jobs.config import IndexConfig, from_args
    from mmembed.jobs.index import IndexJob
    from mmembed.jobs.runner import run

    return job_main("index", build_parser(), lambda args: run(IndexJob(from_args(IndexConfig, args))), argv)


if __name__ == "__main__":
    from mmembed.cli.options import exit_process

    exit_process(main())
