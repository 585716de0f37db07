"""Entry point: retrieval quality of an embedding store version on your own judgements (`mmembed evaluate`).

    python -m pipelines.evaluate ROOT [--version SLUG/VERSION] --queries Q --qrels R [--json PATH]

The work itself is mmembed/jobs/evaluate.py.
"""

from __future__ import annotations

import argparse

from mmembed.cli.options import add_evaluation_options, job_main


def build_parser(prog: str = "mmembed evaluate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Evaluate retrieval on your own queries and relevance judgements: the queries are embedded "
        "with the version's recorded model and settings (encode_query), the exact top-k is searched over the "
        "snapshot's shards with the version's similarity function, and ST's InformationRetrievalEvaluator "
        "computes accuracy, precision, recall, MRR, NDCG and MAP at each k. The result is recorded in the "
        "snapshot's _eval/ folder and reused for the same queries and qrels files; `mmembed versions` shows "
        "it. Use `mmembed activate --if-better` or `mmembed reembed --activate-if-better` to gate an upgrade on it.",
        epilog="Relevant judged documents missing from the corpus embeddings are counted and scored as misses, as "
        "ST scores them. Exit codes: 0 ok, 2 bad input or usage (malformed TSV/JSONL, qrels naming unknown "
        "queries, empty qrels, no committed snapshot; nothing ran), 1 the search failed.",
    )
    p.add_argument("root", help="An embedding store root (local path or fsspec URI), or the output folder of "
                   "`mmembed embed`.")
    p.add_argument("--version", default=None, help="The store version to evaluate, as `mmembed versions` prints it "
                   "(default: CURRENT's).")
    p.add_argument("--snapshot", default=None, help="A committed snapshot of --version (default: its latest).")
    p.add_argument("--json", default=None, metavar="PATH", help="Also write the metrics as JSON, keyed as ST keys "
                   "them (ndcg@10, mrr@10, recall@10, map@100, ...); local path or fsspec URI.")
    add_evaluation_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from mmembed.jobs import evaluate
    from mmembed.jobs.config import EvaluateConfig, from_args

    return job_main("evaluate", build_parser(), lambda args: evaluate.main(from_args(EvaluateConfig, args)), argv)


if __name__ == "__main__":
    from mmembed.cli.options import exit_process

    exit_process(main())
