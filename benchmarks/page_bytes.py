"""Bytes per page of a multi-vector corpus, with and without float16 and token pooling, against one vector.

    .venv/bin/python benchmarks/page_bytes.py [--pages 16] [--json OUT]

The same 1280x800 screenshots (PNG, mmembed/testing/corpus.py) are embedded by `mmembed embed` (in process)
with a ColQwen2-shaped model at vidore/colqwen2-v1.0's pixel budget (mmembed/testing/shapes.py: the tiny
model's weights, its processor sized as the hub's), as float32, float16, and float16 with
--token-pool-factor 2 and 3; and, as the baseline in the same run, with a single-vector Qwen3-VL-shaped
embedder. How many vectors a page keeps is the processor's and the pooling's doing, not the weights', so the
counts are what the real model stores; the bytes are given as stored here (the tiny model's 16-dim vectors,
Parquet with its compression) and as vectors x dim x bytes at the real models' widths (ColQwen2: 128;
Qwen3-VL-Embedding-2B: 2,048 float32), which is what a user plans storage with.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLQWEN_DIM, QWEN3VL_DIM = 128, 2048


def main(argv=None) -> int:
    a = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--pages", type=int, default=16)
    a.add_argument("--workdir", default=None)
    a.add_argument("--json", default=None)
    a.add_argument("--smoke", action="store_true")
    args = a.parse_args(argv)
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mmembed import cli
    from mmembed.jobs.embed import EmbedJob
    from mmembed.jobs.runner import run
    from mmembed.testing.corpus import corpus
    from mmembed.testing.shapes import build_model

    work = Path(args.workdir or tempfile.mkdtemp(prefix="page-bytes-"))
    pages = 2 if args.smoke else args.pages
    with mp.get_context("spawn").Pool(2) as pool:
        files = corpus(str(work), "shots", pages, pool)
    shots = work / "shots"
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir()
    for f in files:
        os.link(f, shots / Path(f).name)
    colqwen = build_model(str(work), "colqwen2", args.smoke, "float32", "cpu")
    qwen = build_model(str(work), "qwen3vl", True, "float32", "cpu")  # the tiny embedder: only its dim differs
    runs = {
        "colqwen2 float32": (colqwen, []),
        "colqwen2 float16": (colqwen, ["--precision", "float16"]),
        "colqwen2 float16, pool 2": (colqwen, ["--precision", "float16", "--token-pool-factor", "2"]),
        "colqwen2 float16, pool 3": (colqwen, ["--precision", "float16", "--token-pool-factor", "3"]),
        "qwen3-vl single vector (baseline)": (qwen, []),
    }
    rows = {}
    for label, (model, extra) in runs.items():
        out = work / f"out-{len(rows)}"
        shutil.rmtree(out, ignore_errors=True)
        rc = run(EmbedJob(cli.parse("embed", ["--input", str(shots), "--output", str(out), "--model", model,
                                              "--executor", "local", "--device", "cpu", "--batch-size", "4", *extra])))
        if rc:
            raise SystemExit(f"page_bytes.py: {label} failed with exit {rc}")
        m = json.loads((out / "_manifest.json").read_text())
        stored = sum(f.stat().st_size for f in out.glob("part-*.parquet")) / m["counts"]["written"]
        mv = m["model"].get("multi_vector")
        if mv:
            itemsize = 2 if "float16" in label else 4
            rows[label] = {"vectors_per_page": mv["vectors_per_record"], "stored_bytes_per_page": round(stored),
                           "bytes_per_page_at_real_dim": round(mv["vectors_per_record"] * COLQWEN_DIM * itemsize)}
        else:
            rows[label] = {"vectors_per_page": 1, "stored_bytes_per_page": round(stored),
                           "bytes_per_page_at_real_dim": QWEN3VL_DIM * 4}
    base = rows["qwen3-vl single vector (baseline)"]["bytes_per_page_at_real_dim"]
    print(f"{pages} screenshots 1280x800; bytes per page at the real widths (ColQwen2 128, Qwen3-VL 2,048):")
    for label, r in rows.items():
        r["ratio_to_single_vector"] = round(r["bytes_per_page_at_real_dim"] / base, 2)
        print(f"  {label:<36} {r['vectors_per_page']:>7} vectors  {r['bytes_per_page_at_real_dim']:>9,} B "
              f"({r['ratio_to_single_vector']:>5}x one vector)   stored here {r['stored_bytes_per_page']:,} B")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
