"""Scale and memory: does the embed job stay flat as the corpus grows?

    python benchmarks/scale.py                          # 10k, 100k, 1M short texts + 20k small images
    python benchmarks/scale.py --sizes 10000,100000 --images 20000 --json scale.json

Each corpus is generated on local disk and embedded by `mmembed embed` (mmembed.cli.main) in a
fresh driver process with its own Ray runtime (2 CPUs, 1.5 GB object store, as on the 2-core CI
machine), with a tiny offline random-weight CLIP (text tower for texts, vision tower for images)
so that the pipeline, not the model, is what is measured. Per run it records:

- peak driver RSS (the driver process alone, its VmHWM): nothing may collect the corpus there;
- bytes spilled from the object store to disk (Ray's memory summary): blocks must stay small;
- records/s over the whole job (plan, Ray start, read, preprocess, encode, write, manifest);
- output shard count.

Targets: driver RSS grows by at most 200 MB from 10k to 1M records, zero spill, and records/s
that does not fall as the corpus grows. The baseline is the smallest size of the same run: the
figures are growth against it, not a ratio to another tool (none runs this job to compare with).

    python benchmarks/scale.py --diff-ids 1000000,3000000,10000000

measures reembed's diff alone (`mmembed.jobs.reembed.diff_buckets`, the change pass after hashing) on
synthetic (id, content_hash) input shards against a synthetic base snapshot of as many rows (1% of
ids changed, 1% new, 1% deleted, 4-dim embeddings), each size in a fresh driver as above, and checks
the counts. Target: driver RSS grows by at most 200 MB from the smallest to the largest size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# -- corpora -------------------------------------------------------------------------------------------
def make_texts(root: Path, n: int, files: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = root / f"texts-{n}"
    out.mkdir(parents=True, exist_ok=True)
    step = -(-n // files)
    words = ["screenshot", "invoice", "login", "error", "dialog", "chart", "table", "menu", "settings", "map"]
    for k in range(files):
        lo, hi = k * step, min(n, (k + 1) * step)
        if lo >= hi:
            break
        ids = [f"t{i:08d}" for i in range(lo, hi)]
        texts = [f"{words[i % 10]} {words[(i // 10) % 10]} number {i}" for i in range(lo, hi)]
        pq.write_table(pa.table({"id": ids, "text": texts}), out / f"part-{k:04d}.parquet")
    return out


def make_images(root: Path, n: int) -> Path:
    import io

    import numpy as np
    from PIL import Image

    out = root / f"images-{n}"
    rng = np.random.default_rng(0)
    for i in range(n):
        d = out / f"{i // 1000:03d}"
        if i % 1000 == 0:
            d.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
        (d / f"img{i:06d}.png").write_bytes(buf.getvalue())
    return out


# -- one measured run (a fresh process) ----------------------------------------------------------------
def _status_mb(field: str) -> float:
    """VmHWM (peak) or VmRSS (now) of this process, in MB.

    Not `ru_maxrss`: Linux carries it across exec, so a worker started by a parent that had just
    generated a corpus reported the parent's peak (a 10 MB child of a 218 MB parent reads 218 MB).
    """
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(argv: list[str], object_store: int) -> dict:
    import ray

    ray.init(num_cpus=2, object_store_memory=object_store, include_dashboard=False, logging_level="WARNING")
    from ray.data import DataContext

    from mmembed import cli

    DataContext.get_current().enable_progress_bars = False
    started = time.time()
    rc = cli.main(["embed", *argv])
    wall = time.time() - started
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    # What `ray memory --stats-only` reports as "Spilled N MiB", for this runtime alone.
    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    spilled = int(reply.store_stats.spilled_bytes_total)
    manifest = json.loads(Path(argv[argv.index("--output") + 1], "_manifest.json").read_text())
    ray.shutdown()
    return {
        "rc": rc,
        "records": manifest["counts"]["records"],
        "written": manifest["counts"]["written"],
        "errors": manifest["counts"]["errors"],
        "shards": len(manifest["files"]),
        "wall_s": round(wall, 1),
        "records_per_s": round(manifest["counts"]["records"] / wall, 1),
        "peak_driver_rss_mb": _status_mb("VmHWM"),
        "spilled_mb": round(spilled / 2**20, 1),
    }


def measure(kind: str, n: int, inp: Path, model: str, work: Path, extra: list[str], object_store: int) -> dict:
    out = work / f"out-{kind}-{n}"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["--input", str(inp), "--output", str(out), "--model", model, "--device", "cpu", *extra]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(argv),
           "--object-store", str(object_store)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("SCALE-RESULT ")]
    if proc.returncode or not line:
        raise RuntimeError(f"{kind} {n} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = {"corpus": kind, "size": n, **json.loads(line[-1][len("SCALE-RESULT "):])}
    shutil.rmtree(out, ignore_errors=True)
    return result


# -- reembed's diff ------------------------------------------------------------------------------------
DIFF_FILE_ROWS = 500_000


def make_diff_inputs(root: Path, n: int) -> tuple[Path, Path, dict]:
    """Base snapshot shards and an input of n ids each: 1% of ids changed, 1% new, 1% deleted."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    base, new = root / f"diff-base-{n}", root / f"diff-new-{n}"
    base.mkdir(parents=True, exist_ok=True)
    new.mkdir(parents=True, exist_ok=True)
    counts = {"new": 0, "changed": 0, "unchanged": 0}
    for k, lo in enumerate(range(0, n, DIFF_FILE_ROWS)):
        i = np.arange(lo, min(n, lo + DIFF_FILE_ROWS))
        ids = pa.array([f"d{x:010d}" for x in i.tolist()])
        hashes = pa.array([f"{x:032x}" for x in i.tolist()])
        emb = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(len(i) * 4, np.float32)), 4)
        pq.write_table(pa.table({"id": ids, "modality": pa.array(["text"] * len(i)), "embedding": emb,
                                 "content_hash": hashes}), base / f"part-{k:05d}.parquet")
        # The input: every 100th id deleted, every 100th (offset 50) edited, as many new ids appended.
        keep = i % 100 != 0
        edited = i % 100 == 50
        new_ids = [f"d{x:010d}" for x in i[keep].tolist()] + [f"n{x:010d}" for x in i[~keep].tolist()]
        new_hashes = [f"{x:032x}" if not e else f"{x + 1:032x}" for x, e in zip(i[keep].tolist(), edited[keep])]
        new_hashes += [f"{x + 7:032x}" for x in i[~keep].tolist()]
        pq.write_table(pa.table({"id": new_ids, "content_hash": new_hashes}), new / f"part-{k:05d}.parquet")
        counts["new"] += int((~keep).sum())
        counts["changed"] += int(edited.sum())
        counts["unchanged"] += int(keep.sum() - edited.sum())
    return base, new, counts


def diff_worker(spec: dict, object_store: int) -> dict:
    import pyarrow as pa
    import ray

    ray.init(num_cpus=2, object_store_memory=object_store, include_dashboard=False, logging_level="WARNING")
    from ray.data import DataContext

    from mmembed.jobs.reembed import diff_buckets
    from mmembed.stages.encode import embedding_schema
    from mmembed.stages.read_pairs import read_parquet
    from mmembed.stores.changes import num_buckets

    DataContext.get_current().enable_progress_bars = False
    ready = _status_mb("VmRSS")  # Ray started and the code imported: what the diff adds comes after
    base = sorted(str(p) for p in Path(spec["base"]).glob("*.parquet"))
    new = sorted(str(p) for p in Path(spec["new"]).glob("*.parquet"))
    schema = embedding_schema(4).append(pa.field("content_hash", pa.string()))
    started = time.time()
    buckets = num_buckets(spec["n"])
    counts, _ = diff_buckets(read_parquet(new, new[0], {}), base, [], buckets, spec["out"], schema, {})
    wall = time.time() - started
    ray.shutdown()
    return {"counts": counts, "buckets": buckets, "wall_s": round(wall, 1),
            "records_per_s": round(spec["n"] / wall, 1), "driver_rss_before_mb": ready,
            "peak_driver_rss_mb": _status_mb("VmHWM")}


def measure_diff(n: int, work: Path, object_store: int) -> dict:
    base, new, expected = make_diff_inputs(work, n)
    out = work / f"diff-out-{n}"
    shutil.rmtree(out, ignore_errors=True)
    spec = {"n": n, "base": str(base), "new": str(new), "out": str(out)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--diff-worker", json.dumps(spec),
           "--object-store", str(object_store)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("SCALE-RESULT ")]
    if proc.returncode or not line:
        raise RuntimeError(f"diff {n} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = {"size": n, **json.loads(line[-1][len("SCALE-RESULT "):])}
    if result["counts"] != expected:
        raise RuntimeError(f"diff {n}: counts {result['counts']} != expected {expected}")
    for d in (out, base, new):
        shutil.rmtree(d, ignore_errors=True)
    return result


def diff_report(rows: list[dict]) -> None:
    print("| ids | buckets | driver RSS before the diff (MB) | peak driver RSS (MB) | ids/s | wall (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']:,} | {r['buckets']} | {r['driver_rss_before_mb']:,.0f} | {r['peak_driver_rss_mb']:,.0f} | "
              f"{r['records_per_s']:,.0f} | {r['wall_s']:,.0f} |")
    if len(rows) >= 2:
        growth = rows[-1]["peak_driver_rss_mb"] - rows[0]["peak_driver_rss_mb"]
        print(f"- driver RSS growth {rows[0]['size']:,} -> {rows[-1]['size']:,}: {growth:+.0f} MB "
              f"({'ok' if growth <= 200 else 'OVER'} the 200 MB target); counts checked at every size")


def table(rows: list[dict]) -> str:
    head = "| corpus | records | peak driver RSS (MB) | spilled (MB) | records/s | wall (s) | shards | errors |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['corpus']} | {r['records']:,} | {r['peak_driver_rss_mb']:,.0f} | {r['spilled_mb']} | "
            f"{r['records_per_s']:,.0f} | {r['wall_s']:,.0f} | {r['shards']} | {r['errors']} |"
        )
    return "\n".join(lines)


def verdict(rows: list[dict]) -> list[str]:
    texts = sorted((r for r in rows if r["corpus"] == "text"), key=lambda r: r["size"])
    notes = []
    if len(texts) >= 2:
        growth = texts[-1]["peak_driver_rss_mb"] - texts[0]["peak_driver_rss_mb"]
        notes.append(f"driver RSS growth {texts[0]['size']:,} -> {texts[-1]['size']:,}: {growth:+.0f} MB "
                     f"({'ok' if growth <= 200 else 'OVER'} the 200 MB target)")
        rates = [r["records_per_s"] for r in texts]
        notes.append("records/s " + " -> ".join(f"{x:,.0f}" for x in rates)
                     + (" (not falling)" if all(b >= 0.9 * a for a, b in zip(rates, rates[1:])) else " (FALLING)"))
        # Whole-job rates include a fixed start-up (Ray, actors, model loads); the marginal rate between
        # two sizes is the streaming throughput itself.
        marginal = [(b["size"] - a["size"]) / max(b["wall_s"] - a["wall_s"], 1e-9) for a, b in zip(texts, texts[1:])]
        notes.append("marginal records/s between sizes " + " -> ".join(f"{x:,.0f}" for x in marginal))
    spill = sum(r["spilled_mb"] for r in rows)
    notes.append(f"spill: {spill} MB in all ({'ok' if spill == 0 else 'NOT zero'})")
    return notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000", help="Text corpus sizes, comma-separated.")
    ap.add_argument("--images", type=int, default=20000, help="Small (32x32 PNG) images to embed; 0 skips them.")
    ap.add_argument("--files", type=int, default=20, help="Manifest files per text corpus (read parallelism).")
    ap.add_argument("--batch-size", type=int, default=256, help="Encoder batch size.")
    ap.add_argument("--preprocess-batch-size", type=int, default=256, help="Records per preprocess call.")
    ap.add_argument("--object-store", type=int, default=1_500_000_000, help="Object store bytes per run.")
    ap.add_argument("--workdir", default=None, help="Where corpora and outputs go (default: a temp dir, removed).")
    ap.add_argument("--json", default=None, help="Also write the results as JSON here.")
    ap.add_argument("--diff-ids", default=None,
                    help="Instead of embed runs: reembed's diff at these id counts, comma-separated (e.g. 1000000,10000000).")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--diff-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("SCALE-RESULT " + json.dumps(worker(json.loads(args.worker), args.object_store)), flush=True)
        return 0
    if args.diff_worker:
        print("SCALE-RESULT " + json.dumps(diff_worker(json.loads(args.diff_worker), args.object_store)), flush=True)
        return 0

    sys.path.insert(0, str(REPO))
    os.environ["HF_HUB_OFFLINE"] = "1"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mmembed-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.diff_ids:
        rows = []
        try:
            for n in [int(x) for x in args.diff_ids.split(",") if x]:
                rows.append(measure_diff(n, work, args.object_store))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)
        diff_report(rows)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return 0
    from mmembed.testing import tiny_model

    model = tiny_model("clip", work / "models")
    extra = ["--batch-size", str(args.batch_size), "--preprocess-batch-size", str(args.preprocess_batch_size)]
    rows = []
    try:
        for n in [int(x) for x in args.sizes.split(",") if x]:
            inp = make_texts(work, n, args.files)
            rows.append(measure("text", n, inp, model, work, extra, args.object_store))
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(inp, ignore_errors=True)
        if args.images:
            inp = make_images(work, args.images)
            rows.append(measure("image", args.images, inp, model, work, ["--batch-size", "64",
                                "--preprocess-batch-size", "64"], args.object_store))
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(inp, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(rows))
    for note in verdict(rows):
        print("- " + note)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
