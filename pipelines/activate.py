"""`mmembed activate ROOT VERSION [--if-better --queries Q --qrels R]`: point an embedding store's CURRENT at a
committed version, optionally only when it retrieves at least as well as CURRENT (mmembed/jobs/gate.py)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from mmembed.cli.options import add_evaluation_options, add_gate_options, job_main
from mmembed.errors import UsageError
from mmembed.stores.store import Store, StoreError


def build_parser(prog: str = "mmembed activate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Switch the snapshot readers of an embedding store use (its CURRENT pointer) to a committed "
        "version, e.g. after a full re-embed with a new model. One atomic write; the snapshots themselves are "
        "not touched, so switching back is another `mmembed activate`. With --if-better, only when the version "
        "retrieves at least as well as CURRENT on your queries and qrels (see `mmembed evaluate`).",
        epilog="Exit codes: 0 activated (or already CURRENT), 2 not a store, no such committed version/snapshot, "
        "or bad --queries/--qrels (CURRENT unchanged), 4 --if-better and the version is not better: CURRENT "
        "unchanged, both figures printed and recorded in ROOT/_decisions/ (see `mmembed versions`).",
    )
    p.add_argument("root", help="Embedding store root: local path or fsspec URI.")
    p.add_argument("version", help="The version as `mmembed versions` prints it (<model-slug>/<version>), or the "
                   "bare version id when only one model has it.")
    p.add_argument("--snapshot", default=None, help="A committed snapshot of that version (default: its latest), "
                   "e.g. to roll back a bad daily run.")
    add_gate_options(p.add_argument_group("the gate"), "--if-better")
    add_evaluation_options(p, required=False)
    return p


def activate(args) -> int:
    from mmembed.jobs.config import EvaluateConfig
    from mmembed.jobs.evaluate import check_judgements, check_metric
    from mmembed.jobs.gate import decide, lease

    store = Store(args.root, args.storage_options)
    slug, version = store.resolve(args.version)
    if args.snapshot:
        snap = store.snapshot(slug, version, args.snapshot)
        if snap is None:
            names = ", ".join(s.snapshot for s in store.snapshots(slug, version))
            raise StoreError(f"no committed snapshot {args.snapshot!r} in {slug}/{version}; committed: {names}")
    else:
        snap = store.latest(slug, version)
    if not args.if_better:
        if args.queries or args.qrels:
            raise UsageError("--queries and --qrels are for --if-better")
        before = store.current()
        with lease(store, args, f"mmembed activate {slug}/{version}"):
            pointer = store.set_current(snap)
        print(f"CURRENT -> {pointer['path']} (was {before['path'] if before else 'none'})")
        return 0
    if not (args.queries and args.qrels):
        raise UsageError("--if-better needs --queries and --qrels")
    names = {f.name for f in dataclasses.fields(EvaluateConfig)}
    cfg = EvaluateConfig(**{k: v for k, v in vars(args).items() if k in names})
    check_metric(args.metric, tuple(cfg.k))
    queries, qrels = check_judgements(args.queries, args.qrels, dict(args.storage_options))
    with lease(store, args, f"mmembed activate --if-better {slug}/{version}"):
        code, _ = decide(cfg, store, snap, queries, qrels, args.metric, args.min_gain)
    return code


def main(argv: list[str] | None = None) -> int:
    return job_main("activate", build_parser(), activate, argv)


if __name__ == "__main__":
    sys.exit(main())
