"""The upgrade gate: activate a candidate snapshot only when it retrieves at least as well as CURRENT.

Both are evaluated on the same queries and qrels (mmembed/jobs/evaluate.py; a recorded evaluation on
the same fingerprints is reused), and the candidate is activated only when its metric is at least
CURRENT's plus --min-gain. Every decision is kept in ROOT/_decisions/ with both figures, the metric,
the fingerprints and the time, and `mmembed versions` shows each version's latest. The caller holds
the store's lease throughout, so no reembed or activate can move CURRENT in between.
"""

from __future__ import annotations

from mmembed.errors import EXIT_NOT_BETTER
from mmembed.jobs.config import EvaluateConfig
from mmembed.jobs.evaluate import check_metric, evaluate, snapshot_target
from mmembed.outputs.manifest import now_iso
from mmembed.stores.store import Snapshot, Store


def lease(store: Store, cfg, what: str):
    from mmembed.outputs.runstate import RunLock

    return RunLock(store.root, cfg.storage_options, ttl_s=cfg.lease_seconds, run=what)


def decide(cfg: EvaluateConfig, store: Store, candidate: Snapshot, queries, qrels, metric: str, min_gain: float,
           *, say=print) -> tuple[int, dict | None]:
    """(exit code, decision): 0 and CURRENT moved to `candidate`, or EXIT_NOT_BETTER and CURRENT kept."""
    ks = check_metric(metric, tuple(cfg.k))
    current = store.current_snapshot()
    if current is not None and current.path == candidate.path:
        say(f"  CURRENT  already {candidate.path}; nothing to decide")
        return 0, None
    entry = {"version": f"{candidate.slug}/{candidate.version}", "snapshot": candidate.snapshot}
    decision = {"metric": metric, "min_gain": min_gain, "candidate": entry, "current": None,
                "queries": {"uri": queries.uri, "fingerprint": queries.fingerprint},
                "qrels": {"uri": qrels.uri, "fingerprint": qrels.fingerprint}}
    cand = evaluate(cfg, snapshot_target(store, candidate), queries, qrels, ks, say=say)
    entry.update(value=cand["metrics"][metric], evaluation=cand["key"])
    if current is None:
        better, why = True, "the store has no CURRENT to compare with"
    else:
        cur = evaluate(cfg, snapshot_target(store, current), queries, qrels, ks, say=say)
        decision["current"] = {"version": f"{current.slug}/{current.version}", "snapshot": current.snapshot,
                               "value": cur["metrics"][metric], "evaluation": cur["key"]}
        need = cur["metrics"][metric] + min_gain
        better = cand["metrics"][metric] >= need
        why = (f"{metric} {cand['metrics'][metric]:.4f} {'>=' if better else '<'} CURRENT's "
               f"{cur['metrics'][metric]:.4f}" + (f" + min gain {min_gain:g}" if min_gain else ""))
    decision.update(activated=better, reason=why, decided_at=now_iso())
    if better:
        store.set_current(candidate)
    decision["record"] = store.record_decision(decision)
    if better:
        say(f"  CURRENT  -> {candidate.path} ({why})")
        return 0, decision
    say(f"  CURRENT  kept at {current.path}: {candidate.slug}/{candidate.version} is not better ({why}); "
        f"exit {EXIT_NOT_BETTER}")
    return EXIT_NOT_BETTER, decision
