"""The CPU pool against the bare route on the same cores (issue 28): does the pipeline cost more than
the work it exists to do?

    .venv/bin/python benchmarks/host.py [--workloads clip_photos,qwen_shots,pdf_pages] [--pairs 3] [--seconds 20]

For each workload, on the same files and the same number of CPUs, alternating A, B for --pairs rounds:
- bare: a spawn multiprocessing pool, one process per CPU, one thread each, that reads each file,
  decodes it (Pillow, or torchvision's decode_image as ST decodes a path; a PDF page rendered with pypdfium2
  at 72 dpi, the screenshot's own size) and runs the model's own image processor on it: slow class with
  Pillow, fast class with Pillow, fast class with torchvision's decode, all timed (the fastest is the baseline);
  nothing is shipped back;
- mmembed: the real embed job on Ray with the null encoder (mmembed/testing/standin.py), its rate while
  shards stream (the first 10% of rows left out, mmembed/testing/rates.py), sized to stream for at least
  --seconds.
The ratio is mmembed / bare (target >= 1.0), the median of the pairs' ratios. --profile adds where one
preprocess stage's time goes (cProfile of PreprocessStage on the same files, in this process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mmembed.testing.corpus import corpus, pdf_corpus  # noqa: E402
from mmembed.testing.rates import steady_rate, usable_cpus  # noqa: E402
from mmembed.testing.shapes import build_model  # noqa: E402

WORKLOADS = {
    # name: model (mmembed/testing/shapes.py), corpus kind, distinct files, pages per PDF (pdf only)
    "clip_photos": {"model": "clip_b32", "corpus": "photos", "files": 512},
    "qwen_shots": {"model": "qwen3vl", "corpus": "shots", "files": 128},
    "pdf_pages": {"model": "qwen3vl", "corpus": "shots", "files": 128, "pages": 8},
    # Issue 30: a multi-vector model (ColQwen2's processor and pixel budget) on the same screenshots.
    "colqwen_shots": {"model": "colqwen2", "corpus": "shots", "files": 128},
}

_BARE: dict = {}


# The bare route's variants, timed each, the fastest the baseline: the processor's slow (PIL) and fast
# (torchvision) classes, and the fast class fed torchvision's own decode (libjpeg-turbo, libpng), as ST
# decodes an image path; a PDF page is rendered the same way in each.
BARE_VARIANTS = {"slow": (False, "pil"), "fast": (True, "pil"), "fast+tv-decode": (True, "torchvision")}


def _bare_init(model_dir: str, variant: str) -> None:
    import torch
    from transformers import AutoImageProcessor

    fast, decoder = BARE_VARIANTS[variant]
    torch.set_num_threads(1)
    _BARE["processor"] = AutoImageProcessor.from_pretrained(model_dir, backend="torchvision" if fast else "pil")
    _BARE["decoder"] = decoder


def _bare_images(path: str):
    from PIL import Image

    if _BARE.get("decoder") == "torchvision" and not path.endswith(".pdf"):
        from torchvision.io import ImageReadMode, decode_image

        yield decode_image(path, mode=ImageReadMode.RGB)
        return

    if path.endswith(".pdf"):
        import pypdfium2

        doc = pypdfium2.PdfDocument(path)
        try:
            for page in doc:
                yield page.render(scale=1.0).to_pil().convert("RGB")
        finally:
            doc.close()
        return
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    yield img.convert("RGB")


def _bare_chunk(paths: list[str]) -> int:
    done = 0
    for path in paths:
        for img in _bare_images(path):
            _BARE["processor"](images=[img], return_tensors="pt")
            done += 1
    return done


def bare_rate(model_dir: str, variant: str, paths: list[str], cpus: int) -> float:
    """Images (or pages) per second of the bare route over `paths`, after one warm chunk per process."""
    import multiprocessing as mp

    chunk = max(1, min(16, len(paths) // (4 * cpus)))
    jobs = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    with mp.get_context("spawn").Pool(cpus, initializer=_bare_init, initargs=(model_dir, variant)) as pool:
        pool.map(_bare_chunk, jobs[:cpus], chunksize=1)
        t0 = time.perf_counter()
        done = sum(pool.map(_bare_chunk, jobs, chunksize=1))
        return done / (time.perf_counter() - t0)


def mmembed_rate(model_dir: str, files: list[str], n: int, work: Path, column: str, label: str,
                 extra: tuple = ()) -> dict:
    """The embed job on Ray with the null encoder over n records cycling over `files`; its streaming rate."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmembed import cli
    from mmembed.jobs.embed import EmbedJob
    from mmembed.jobs.runner import run
    from mmembed.models.loading import load_model
    from mmembed.stages.encode import EncodeStage
    from mmembed.stages.encode_multi import MultiVectorEncodeStage
    from mmembed.testing.standin import NullEncoder

    manifest = work / f"{label}-manifest-{n}.parquet"
    pq.write_table(pa.table({"id": [f"r{i:08d}" for i in range(n)], column: [files[i % len(files)] for i in range(n)]}),
                   manifest)
    out = work / f"{label}-out-{n}"
    dim = load_model(spec_of(model_dir), weights=False).get_embedding_dimension()
    cfg = cli.parse("embed", ["--input", manifest, "--output", out, "--model", model_dir, "--device", "cpu",
                              "--executor", "ray", "--shard-rows", max(8, n // 40), "--overwrite", *extra])
    t0 = time.perf_counter()
    encoder = MultiVectorEncodeStage if spec_of(model_dir).kind == "multivector" else EncodeStage
    rc = run(EmbedJob(cfg, replacements={encoder: (NullEncoder, {"dim": dim})}))
    wall = time.perf_counter() - t0
    m = json.loads((out / "_manifest.json").read_text())
    if rc or m["counts"]["errors"]:
        raise SystemExit(f"host.py: {label} job failed: rc={rc} counts={m['counts']}")
    units = m["counts"].get("pages") or m["counts"]["written"]
    streaming = steady_rate(str(out), m["files"], wall)
    shutil.rmtree(out, ignore_errors=True)
    return {"n": n, "units": units, "wall_s": wall, "streaming": streaming, "resources": m["resources"],
            "pixels": m["model"].get("pixels")}


def spec_of(model_dir: str):
    """The model's spec, as the embed job's plan makes it (a multi-vector checkpoint loads as one)."""
    from mmembed.models.loading import MULTI_VECTOR, ModelSpec, model_family

    spec = ModelSpec(model_dir)
    return ModelSpec(model_dir, kind="multivector") if model_family(spec) == MULTI_VECTOR else spec


def profile(model_dir: str, paths: list[str], column: str) -> list[tuple[str, float]]:
    """Where one PreprocessStage call's time goes on these files, in this process: its own time (cProfile
    tottime) summed by library, largest first, as shares of the call."""
    import cProfile
    import pstats

    import pyarrow as pa

    from mmembed.models.loading import load_model
    from mmembed.models.pixel_tail import check
    from mmembed.stages.preprocess import PreprocessStage
    from mmembed.stages.read import normalize_manifest_table

    # One fetch thread: fetch and decode run inline, where the profiler sees them (the actors use 8). Pixels
    # leave as the embed job would send them (uint8 where exact, Qwen-VL frames where exact).
    verdict = check(load_model(spec_of(model_dir), weights=False))
    uint8 = verdict["transport"] == "uint8"
    stage = PreprocessStage(spec_of(model_dir), fetch_threads=1, uint8_pixels=uint8,
                            pixel_frames=uint8 and verdict.get("layout") == "frames")
    table = normalize_manifest_table(pa.table({"id": [f"p{i}" for i in range(len(paths))], column: paths}), "")
    stage(table.slice(0, 1))
    prof = cProfile.Profile()
    prof.enable()
    out = stage(table)
    if not isinstance(out, pa.Table):
        list(out)  # PDF pages leave the stage as a generator of tables: render them inside the profile
    prof.disable()
    stats = pstats.Stats(prof)
    by: dict[str, float] = {}
    for (path, _, fn), st in stats.stats.items():
        parts = Path(path).parts
        if "site-packages" in parts:
            key = parts[parts.index("site-packages") + 1]
        elif "mmembed" in parts:
            key = "/".join(parts[parts.index("mmembed"):])
        else:
            key = f"builtin {fn}" if path == "~" else Path(path).name
        by[key] = by.get(key, 0.0) + st[2]
    total = max(sum(by.values()), 1e-9)
    return sorted(((k, v / total) for k, v in by.items()), key=lambda r: -r[1])[:12]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=20.0, help="Least time each mmembed job streams shards.")
    p.add_argument("--workdir", default="/tmp/mmembed_host")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--compare-float", action="store_true", help="Also run mmembed with --transport-dtype float32 "
                   "(the processor's float pixels, as before uint8 transport) in each pair.")
    p.add_argument("--smoke", action="store_true", help="Tiny corpora, one pair: a check of the script.")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import multiprocessing as mp

    import ray

    cpus = usable_cpus()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    report = {"cpus": cpus, "workloads": {}}
    for name in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        spec = WORKLOADS[name]
        distinct = 8 if args.smoke else spec["files"]
        with mp.get_context("spawn").Pool(cpus) as pool:
            files = corpus(str(work), spec["corpus"], distinct, pool)
            column, unit_files = "image", files
            if spec.get("pages"):
                unit_files = pdf_corpus(str(work), files, spec["pages"], pool)
                column = "pdf"
        model_dir = build_model(str(work), spec["model"], True, "float32", "cpu")
        per_unit = spec.get("pages", 1)
        bare = {}
        for variant in BARE_VARIANTS:
            try:
                bare[variant] = bare_rate(model_dir, variant, unit_files, cpus)
            except Exception as exc:  # noqa: BLE001 - a processor without a fast class: the slow one stands
                print(f"[{name}] {variant} processor: {type(exc).__name__}: {exc}", flush=True)
        baseline = max(bare, key=bare.get)
        print(f"[{name}] bare route, {cpus} processes: " + ", ".join(f"{k} {v:.1f}/s" for k, v in bare.items()),
              flush=True)
        units = max(4 * per_unit, int(args.seconds * 1.5 * bare[baseline])) if not args.smoke else 4 * per_unit
        n = max(1, -(-units // per_unit))
        if not spec.get("pages") and not args.smoke:
            # The plan gives an input of at most 2,000 media records one preprocess actor (a small job is
            # mostly start-up): a slow machine's 20 s would measure one actor against `cpus` processes.
            from mmembed.executors.cluster import RECORDS_PER_PREPROCESSOR

            n = max(n, (cpus - 1) * RECORDS_PER_PREPROCESSOR["media"] + 1)
        if not ray.is_initialized():
            ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR")
        pairs = []
        for i in range(1 if args.smoke else args.pairs):
            b = bare_rate(model_dir, baseline, unit_files, cpus) if i else bare[baseline]
            mm = mmembed_rate(model_dir, unit_files, n, work, column, name)
            rate = mm["streaming"] or mm["units"] / mm["wall_s"]
            pairs.append({"bare": b, "mmembed": rate, "ratio": rate / b, "job": mm})
            print(f"[{name}] pair {i + 1}: bare {b:.1f}/s, mmembed {rate:.1f}/s while shards stream "
                  f"({mm['units']} in {mm['wall_s']:.1f} s, {mm['resources'].get('num_preprocessors')} preprocess "
                  f"actors, pixels {(mm['pixels'] or {}).get('transport')}): {rate / b:.3f}", flush=True)
            if args.compare_float:
                fl = mmembed_rate(model_dir, unit_files, n, work, column, name, ("--transport-dtype", "float32"))
                frate = fl["streaming"] or fl["units"] / fl["wall_s"]
                pairs[-1].update(float_mmembed=frate, float_ratio=frate / b)
                print(f"[{name}] pair {i + 1}: mmembed with float32 pixels {frate:.1f}/s: {frate / b:.3f}", flush=True)
        out = {"bare": bare, "baseline": baseline, "pairs": pairs,
               "median_ratio": statistics.median(x["ratio"] for x in pairs)}
        if args.compare_float:
            out["median_float_ratio"] = statistics.median(x["float_ratio"] for x in pairs)
            print(f"[{name}] mmembed with float32 pixels / bare: {out['median_float_ratio']:.3f}", flush=True)
        if args.profile:
            out["profile"] = profile(model_dir, unit_files[: 8 if args.smoke else 32], column)
            for fn, share in out["profile"]:
                print(f"[{name}]   {share:6.1%}  {fn}", flush=True)
        report["workloads"][name] = out
        ratios = ", ".join(format(x["ratio"], ".3f") for x in pairs)
        print(f"[{name}] mmembed / bare: {out['median_ratio']:.3f} (pairs: {ratios})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
