"""Entry point: keep a versioned embedding store current (`mmembed reembed`).

    python -m pipelines.reembed --input URI --store ROOT --model NAME_OR_PATH [--revision R] [--activate]

The job itself is mmembed/jobs/reembed.py.
"""

from __future__ import annotations

import argparse

from mmembed.cli.options import (
    add_embedding_options,
    add_gate_options,
    add_input_options,
    add_io_options,
    add_model_options,
    add_runtime_options,
    job_main,
)


def build_parser(prog: str = "mmembed reembed") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Re-embed a corpus into a versioned embedding store. With the model and settings of an "
        "existing version, only new and changed records are embedded (judged by a content hash of their "
        "text and media bytes), unchanged ones carry over and ids that left the input are dropped. A new "
        "model or new settings embed everything into a new version; the current one keeps being served "
        "until --activate or `mmembed activate` switches CURRENT.",
        epilog="Store layout: ROOT/<model-slug>/<version>/<snapshot>/ holds part-*.parquet (id, embedding, "
        "modality, content_hash), _errors/, _changes/ (id, content_hash, status) and _manifest.json; "
        "ROOT/CURRENT names the snapshot readers should use. The report counts records as new (id not in the base "
        "snapshot), changed (content hash differs, or the base has an error row for it), unchanged (carried over) "
        "and deleted (in the base, not in the input). A run that fails or is killed leaves CURRENT and "
        "every committed snapshot as they were. Exit codes: 0 ok, 2 bad usage (nothing modified), 3 more "
        "errors than --max-error-fraction (snapshot kept, CURRENT not moved), 4 --activate-if-better kept CURRENT "
        "(snapshot kept), 1 job failed.",
    )
    p.add_argument("--input", required=True, help="Manifest or media directory/glob: local path or fsspec URI.")
    p.add_argument("--store", required=True, help="Embedding store root: local path or fsspec URI. A missing or "
                   "empty directory becomes a new store.")
    add_input_options(p)
    add_model_options(p)
    add_embedding_options(p)
    g = p.add_argument_group("versions")
    g.add_argument(
        "--activate",
        action="store_true",
        help="Point CURRENT at this run's snapshot once it commits, even when its version is not the current "
        "one (a new model or new settings). Runs of the current version, and the first run in a store, "
        "move CURRENT without it.",
    )
    add_gate_options(g, "--activate-if-better")
    g.add_argument("--full", action="store_true", help="Embed every record again, carrying nothing over from the "
                   "version's latest snapshot.")
    g = p.add_argument_group("concurrent runs")
    g.add_argument(
        "--wait",
        action="store_true",
        help="When another reembed holds the store's lease (ROOT/_lock.json), wait for it to finish instead "
        "of exiting with code 2; the run then starts from whatever that one committed.",
    )
    g.add_argument(
        "--wait-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="With --wait, give up (exit 2, nothing modified) after this long, so a scheduled run cannot hang "
        "behind a stuck one (default: wait as long as the holder keeps its lease alive). A holder that "
        "crashed is taken over without waiting on this host, and after --lease-seconds elsewhere.",
    )
    g.add_argument(
        "--lease-seconds",
        type=float,
        default=60.0,
        help="This run's lease on the store is renewed every quarter of this; a crashed run's lease on another "
        "host is taken over once it is this old (default: 60).",
    )
    add_runtime_options(p)
    add_io_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from mmembed.jobs.config import ReembedConfig, from_args
    from mmembed.jobs.reembed import ReembedJob
    from mmembed.jobs.runner import run

    return job_main("reembed", build_parser(), lambda args: run(ReembedJob(from_args(ReembedConfig, args))), argv)


if __name__ == "__main__":
    from mmembed.cli.options import exit_process

    exit_process(main())
