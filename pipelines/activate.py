"""`mmembed activate ROOT VERSION`: point an embedding store's CURRENT at a committed version."""

from __future__ import annotations

import argparse
import sys

from mmembed.cli.options import add_storage_option
from mmembed.errors import UsageError
from mmembed.stores.store import Store, StoreError


def build_parser(prog: str = "mmembed activate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Switch the snapshot readers of an embedding store use (its CURRENT pointer) to a committed "
        "version, e.g. after a full re-embed with a new model. One atomic write; the snapshots themselves are "
        "not touched, so switching back is another `mmembed activate`.",
        epilog="Exit codes: 0 ok, 2 not a store or no such committed version/snapshot (CURRENT unchanged).",
    )
    p.add_argument("root", help="Embedding store root: local path or fsspec URI.")
    p.add_argument(
        "version",
        help="The version as `mmembed versions` prints it (<model-slug>/<version>), or the bare version id when "
        "only one model has it.",
    )
    p.add_argument(
        "--snapshot",
        default=None,
        help="A committed snapshot of that version (default: its latest), e.g. to roll back a bad daily run.",
    )
    add_storage_option(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        store = Store(args.root, args.storage_options)
        slug, version = store.resolve(args.version)
        if args.snapshot:
            snap = store.snapshot(slug, version, args.snapshot)
            if snap is None:
                names = ", ".join(s.snapshot for s in store.snapshots(slug, version))
                raise StoreError(f"no committed snapshot {args.snapshot!r} in {slug}/{version}; committed: {names}")
        else:
            snap = store.latest(slug, version)
        before = store.current()
        pointer = store.set_current(snap)
    except UsageError as exc:
        print(f"mmembed activate: error: {exc}", file=sys.stderr)
        return 2
    print(f"CURRENT -> {pointer['path']} (was {before['path'] if before else 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
