"""`mmembed versions ROOT`: the versions of an embedding store, their counts, dates, and CURRENT."""

from __future__ import annotations

import argparse
import json
import sys

from mmembed.cli.options import add_storage_option
from mmembed.errors import UsageError
from mmembed.stores.store import Store


def build_parser(prog: str = "mmembed versions") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="List the committed versions of an embedding store: records and errors in each version's "
        "latest snapshot, when it was created and last updated, which one CURRENT points at, and under each "
        "version its latest evaluation (`mmembed evaluate`) and --if-better gate decision. Read-only.",
        epilog="Exit codes: 0 ok, 2 not an mmembed store.",
    )
    p.add_argument("root", help="Embedding store root: local path or fsspec URI.")
    p.add_argument("--json", action="store_true", help="Print the listing as JSON (one object per version).")
    add_storage_option(p)
    return p


def judged(v: dict) -> list[str]:
    """The version's latest evaluation and gate decision, one line each."""
    lines = []
    e = v.get("evaluation")
    if e:
        shown = " ".join(f"{k}={e['metrics'][k]:.4f}" for k in ("ndcg@10", "mrr@10", "recall@10") if k in e["metrics"])
        lines.append(f"evaluated {e['evaluated_at']}: {shown or e['metrics']} ({e['queries']} queries, {e['qrels']})")
    d = v.get("decision")
    if d:
        verdict = "activated" if d["activated"] else "refused"
        lines.append(f"gate {d['decided_at']}: {verdict}, {d['reason']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        store = Store(args.root, args.storage_options)
        versions = store.versions()
        current = store.current()
    except UsageError as exc:
        print(f"mmembed versions: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"root": store.root, "current": current, "versions": versions}, indent=2))
        return 0
    print(f"store {store.root}: {len(versions)} version(s); CURRENT -> {current['path'] if current else 'none'}")
    if versions:
        width = max(len(v["version"]) for v in versions)
        header = f"{'version':<{width}}  {'records':>10}  {'errors':>7}  {'snapshots':>9}  {'updated':<25}  model"
        print(f"    {header}")
        for v in versions:
            mark = "*" if v["current"] else " "
            print(
                f"  {mark} {v['version']:<{width}}  {v['records']:>10,}  {v['errors']:>7,}  {v['snapshots']:>9}  "
                f"{v['updated_at'] or '':<25}  {v['model']} @ {v['revision']} dim={v['dim']}"
            )
            for line in judged(v):
                print(f"      {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
