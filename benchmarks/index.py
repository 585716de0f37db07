"""Approximate search (`mmembed index` + `search --index`) vs the strongest exact search, in one run.

    .venv/bin/python benchmarks/index.py [--n 1000000] [--dim 384] [--queries 1000] [--smoke] [--json OUT]

For each corpus (cosine similarity, unit vectors as a normalising model writes them):
- iid: i.i.d. Gaussian vectors, the issue's "random vectors". Nearest neighbours of random
  high-dimensional points are barely nearer than any other point, so no index can skip much of
  the corpus here: this is the worst case, reported as it comes out.
- clustered: vectors of a low-rank, clustered latent (a mixture of --clusters Gaussians in a
  --rank-dim subspace) plus isotropic noise, then normalised: real embeddings have topics and far
  fewer effective dimensions than their width, which is what IVF and HNSW exploit. Queries are
  fresh draws from the same mixture.

Baseline: FAISS's exact flat inner-product index (`IndexFlatIP` over the unit vectors, all queries
at once), the fastest exact search there is on a CPU, timed as the approximate points are: the
best rate of repeated runs over at least --min-seconds (at least 1 s). mmembed's own exact search
(`SearchStage.search`: ST's cos_sim over --corpus-block-rows blocks with a running top-k,
--query-batch-size queries per pass, the corpus held in memory) is timed the same way and reported
beside it; recall is against its top-k. Each index is
built once by mmembed's `IndexBuilder` (sample-trained, added shard by shard, as `mmembed index`
does) and searched through `AnnIndex` (what `search --index` runs), sweeping the search-time
parameter (IVF nprobe, HNSW ef_search) on that one build. Per point: build time, queries/s, the
ratio to the exact queries/s and recall@k against the exact top-k; a point "meets" the issue's
target when recall@10 >= 0.95 at >= 20x the exact queries/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from mmembed.stages.search import SearchStage  # noqa: E402
from mmembed.stores.index import AnnIndex, EmbeddingSource, IndexBuilder, IndexParams  # noqa: E402

TARGET_RECALL, TARGET_RATIO = 0.95, 20.0


# --------------------------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------------------------
def normalised(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def iid(n: int, dim: int, rng, chunk: int = 100_000, **_) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, chunk):
        out[s:s + chunk] = normalised(rng.standard_normal((min(chunk, n - s), dim), dtype=np.float32))
    return out


def clustered(n: int, dim: int, rng, *, mixture, chunk: int = 100_000, noise: float = 0.5) -> np.ndarray:
    """Rows = (cluster centre + spread) in a low-rank subspace, plus isotropic noise, normalised.

    noise is the noise's share of a row's expected squared norm relative to the latent part's."""
    centres, basis, spread = mixture
    rank = basis.shape[0]
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        z = centres[rng.integers(0, len(centres), m)] + spread * rng.standard_normal((m, rank), dtype=np.float32)
        x = z @ basis
        x += np.sqrt(noise * (1 + spread**2) * rank / dim) * rng.standard_normal((m, dim), dtype=np.float32)
        out[s:s + m] = normalised(x)
    return out


def make_mixture(rng, dim: int, rank: int, clusters: int, spread: float = 0.6):
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0].T.astype(np.float32)  # orthonormal rows
    return rng.standard_normal((clusters, rank), dtype=np.float32), basis, np.float32(spread)


# --------------------------------------------------------------------------------------------
# mmembed's code on an in-memory corpus
# --------------------------------------------------------------------------------------------
class MemorySource(EmbeddingSource):
    """An embed output's shards, held in memory: IndexBuilder reads it as it reads Parquet shards."""

    def __init__(self, x: np.ndarray, shard_rows: int):
        n, dim = x.shape
        files = [{"name": f"shard-{i}", "rows": min(shard_rows, n - s), "start": s}
                 for i, s in enumerate(range(0, n, shard_rows))]
        model = {"name": "benchmark", "revision": None, "dim": dim, "normalize": True, "similarity_fn_name": "cosine"}
        super().__init__("memory", "memory", {"model": model, "files": files, "counts": {"written": n}})
        self.x = x

    def shard(self, entry: dict):
        s, rows = entry["start"], entry["rows"]
        return pa.array(np.arange(s, s + rows).astype(str)), self.x[s:s + rows]


class MemoryExactSearch(SearchStage):
    """mmembed's exact search (SearchStage.search) with the corpus blocks coming from memory."""

    def __init__(self, x: np.ndarray, ids: np.ndarray, *, top_k: int, block_rows: int):
        super().__init__([], dim=x.shape[1], top_k=top_k, similarity_fn_name="cosine", block_rows=block_rows,
                         device="cpu")
        self.x, self.ids = x, ids

    def corpus_blocks(self):
        for s in range(0, len(self.x), self.block_rows):
            yield self.ids[s:s + self.block_rows], self.x[s:s + self.block_rows], None


def timed_rate(fn, n: int, min_s: float) -> tuple[float, object]:
    """(calls of fn per second x n, the last result): repeated until min_s has passed, best rate."""
    best, out, spent = 0.0, None, 0.0
    while spent < min_s or not best:
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        spent += dt
        best = max(best, n / dt)
    return best, out


def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def points(args, n: int) -> list[tuple[IndexParams, str, list[int]]]:
    """(build parameters, search parameter name, values swept on that one build)."""
    out = [(IndexParams(kind="flat"), "-", [0])]
    for kind in args.ivf_kinds:
        p = IndexParams(kind=kind, nlist=args.nlist).resolve(n, args.dim)
        probes = sorted({v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256) if v < p.nlist} | {p.nprobe})
        if args.smoke:
            probes = sorted(set(probes[:2]) | {p.nprobe, p.nlist})  # nprobe = nlist must equal exact
        out.append((IndexParams(kind=kind, nlist=args.nlist), "nprobe", probes))
    if n <= args.hnsw_max_n:
        out.append((IndexParams(kind="hnsw"), "ef_search", [16, 32, 64, 128, 256] if not args.smoke else [16, 128]))
    return out


def run_corpus(name: str, x: np.ndarray, q: np.ndarray, args) -> dict:
    k = args.k
    ids = np.arange(len(x)).astype(str).astype(object)
    exact = MemoryExactSearch(x, ids, top_k=k, block_rows=args.corpus_block_rows)
    batches = [q[s:s + args.query_batch_size] for s in range(0, len(q), args.query_batch_size)]

    def exact_all():
        return np.concatenate([exact.search(b)[1] for b in batches])

    import faiss

    exact.search(q[:8])  # warm-up (first-call allocations), not timed
    min_s = max(args.min_seconds, 0.0 if getattr(args, "smoke", False) else 1.0)
    mm_exact_qps, truth = timed_rate(exact_all, len(q), min_s)
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    flat.search(q[:8], k)
    exact_qps, (_, flat_found) = timed_rate(lambda: flat.search(q, k), len(q), min_s)
    agree = recall(ids[flat_found], truth, k)
    del flat
    print(f"\n[{name}] N={len(x):,} dim={x.shape[1]} queries={len(q):,}: exact FAISS flat {exact_qps:,.1f} queries/s "
          f"(the baseline); mmembed's exact search {mm_exact_qps:,.1f} queries/s ({mm_exact_qps / exact_qps:.2f}x); "
          f"their top-{k} agree on {agree:.4f}", flush=True)
    source = MemorySource(x, args.shard_rows)
    rows = []
    for params, knob, values in points(args, len(x)):
        t = time.perf_counter()
        builder = IndexBuilder(source, params)
        index, row_ids = builder.build()
        build_s = time.perf_counter() - t
        ann = AnnIndex(index, row_ids, builder.params.to_dict(), builder.metric, builder.normalize)
        for v in values:
            ann.tune(**({knob: v} if knob != "-" else {}))
            qps, (_, found) = timed_rate(lambda: ann.search(q, k), len(q), args.min_seconds)
            r = recall(found, truth, k)
            ratio = qps / exact_qps
            row = {"kind": builder.params.kind, "build": builder.params.to_dict(), "knob": knob,
                   "value": v if knob != "-" else None, "build_s": round(build_s, 2), "qps": round(qps, 1),
                   "ratio": round(ratio, 2), "recall": round(r, 4),
                   "meets": bool(r >= TARGET_RECALL and ratio >= TARGET_RATIO)}
            rows.append(row)
            label = builder.params.kind + (f" nlist={builder.params.nlist}" if builder.params.nlist else "")
            setting = f"{knob}={v}" if knob != "-" else ""
            print(f"  {label:<18} {setting:<14} build {build_s:7.1f} s  "
                  f"{qps:>11,.1f} q/s  {ratio:7.2f}x  recall@{k} {r:.4f}  {'MEETS' if row['meets'] else ''}",
                  flush=True)
        del ann, index, builder
        gc.collect()
    best = [r for r in rows if r["recall"] >= TARGET_RECALL]
    return {"n": len(x), "dim": int(x.shape[1]), "queries": len(q), "exact_qps": round(exact_qps, 1),
            "exact_baseline": "faiss IndexFlatIP", "mmembed_exact_qps": round(mm_exact_qps, 1), "exact_agreement": agree,
            "points": rows, "fastest_at_target_recall": max(best, key=lambda r: r["qps"]) if best else None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="corpus vectors (default: 1,000,000)")
    p.add_argument("--dim", type=int, default=384, help="dimensions (default: 384, MiniLM's)")
    p.add_argument("--queries", type=int, default=1000, help="queries (default: 1000)")
    p.add_argument("--k", type=int, default=10, help="top-k, and recall@k (default: 10)")
    p.add_argument("--corpora", default="iid,clustered", help="comma list of iid, clustered (default: both)")
    p.add_argument("--rank-dim", type=int, default=64, help="clustered: latent rank (default: 64)")
    p.add_argument("--clusters", type=int, default=2000, help="clustered: mixture components (default: 2000)")
    p.add_argument("--ivf-kinds", default="ivf-flat,ivf-sq8", help="IVF kinds built (default: ivf-flat,ivf-sq8)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default: mmembed index's, by corpus size)")
    p.add_argument("--hnsw-max-n", type=int, default=200_000,
                   help="build HNSW only up to this N (default: 200,000; its build is the slowest on few cores)")
    p.add_argument("--query-batch-size", type=int, default=1024, help="exact search: search's default (1024)")
    p.add_argument("--corpus-block-rows", type=int, default=16_384, help="exact search: search's default (16384)")
    p.add_argument("--shard-rows", type=int, default=100_000, help="rows per in-memory shard fed to the builder")
    p.add_argument("--min-seconds", type=float, default=1.0, help="repeat each ANN timing at least this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: every measurement runs in seconds")
    p.add_argument("--json", default=None, help="also write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.n, args.dim, args.queries, args.rank_dim, args.clusters = 3000, 32, 40, 8, 30
        args.nlist, args.min_seconds, args.shard_rows = args.nlist or 16, 0.0, 700
    args.ivf_kinds = [k for k in args.ivf_kinds.split(",") if k]
    import faiss
    import torch

    print(f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)", flush=True)
    rng = np.random.default_rng(args.seed)
    report = {"args": {k: v for k, v in vars(args).items() if k != "json"}, "results": {}}
    for name in [c for c in args.corpora.split(",") if c]:
        t = time.perf_counter()
        if name == "iid":
            x, q = iid(args.n, args.dim, rng), iid(args.queries, args.dim, rng)
        elif name == "clustered":
            mix = make_mixture(rng, args.dim, args.rank_dim, args.clusters)
            x, q = clustered(args.n, args.dim, rng, mixture=mix), clustered(args.queries, args.dim, rng, mixture=mix)
        else:
            raise SystemExit(f"unknown corpus {name!r} (iid, clustered)")
        print(f"[{name}] generated in {time.perf_counter() - t:.1f} s", flush=True)
        report["results"][name] = run_corpus(name, x, q, args)
        del x, q
        gc.collect()
    print(f"\ntarget: recall@{args.k} >= {TARGET_RECALL} at >= {TARGET_RATIO:.0f}x the exact queries/s")
    for name, r in report["results"].items():
        b = r["fastest_at_target_recall"]
        met = [p for p in r["points"] if p["meets"]]
        print(f"  {name}: fastest point with recall >= {TARGET_RECALL}: "
              + (f"{b['kind']}{'' if b['knob'] == '-' else ' ' + b['knob'] + '=' + str(b['value'])} {b['ratio']}x "
                 f"recall {b['recall']}" if b else "none")
              + f"; points meeting the target: {len(met)}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
