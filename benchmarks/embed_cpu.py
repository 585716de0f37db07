"""mmembed end to end vs SentenceTransformer.encode on this machine's CPUs, in one run.

    .venv/bin/python benchmarks/embed_cpu.py [--images 2000] [--num-preprocessors 2]

Workload: a tiny random-weight CLIP (built locally) over generated 640x480 JPEG photos on disk.
- baseline: ST's own loop, decoding each file with Pillow and calling `encode` (batch 32);
- mmembed: `pipelines.embed` from the files on disk to Parquet on disk, in-process Ray.
Startup is the wall time of a first 16-image job on a cold Ray (Ray start, actor start, model
load, write); the throughput job then runs the full set. Prints both rates and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_photos(root: Path, n: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    paths = []
    for i in range(n):
        p = root / f"photo-{i:05d}.jpg"
        if not p.exists():
            a, b = rng.random(2)
            base = np.stack([(x * a + y * b + 40 * c) % 256 for c in range(3)], axis=-1)
            arr = np.clip(base + rng.normal(0, 10, size=base.shape), 0, 255).astype("uint8")
            Image.fromarray(arr).save(p, quality=90)
        paths.append(p)
    return paths


def st_baseline(model_path: str, paths: list[Path], batch_size: int) -> tuple[float, object]:
    from PIL import Image
    from sentence_transformers import SentenceTransformer

    t0 = time.perf_counter()
    model = SentenceTransformer(model_path, device="cpu")
    out = []
    for start in range(0, len(paths), batch_size):
        imgs = [Image.open(p).convert("RGB") for p in paths[start : start + batch_size]]
        out.append(model.encode(imgs, batch_size=batch_size))
    return time.perf_counter() - t0, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-preprocessors", type=int, default=None, help="default: mmembed's own sizing")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="write the result here as JSON")
    args = ap.parse_args()

    from mmembed.testing import tiny_model
    from pipelines import embed

    work = Path(args.workdir or tempfile.mkdtemp(prefix="mmembed-bench-"))
    clip = tiny_model("clip", work / "models")
    photos = make_photos(work / "photos", args.images)
    warm = work / "warm"
    if not warm.exists():
        warm.mkdir()
        for p in photos[:16]:
            shutil.copy(p, warm / p.name)

    st_s, _ = st_baseline(clip, photos, args.batch_size)

    extra = ["--batch-size", str(args.batch_size)]
    if args.num_preprocessors:
        extra += ["--num-preprocessors", str(args.num_preprocessors)]
    for sub in ("out-warm", "out"):
        shutil.rmtree(work / sub, ignore_errors=True)
    t0 = time.perf_counter()
    assert embed.main(["--input", str(warm), "--output", str(work / "out-warm"), "--model", clip, *extra]) == 0
    startup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert embed.main(["--input", str(work / "photos"), "--output", str(work / "out"), "--model", clip, *extra]) == 0
    mm_s = time.perf_counter() - t0
    manifest = json.loads((work / "out" / "_manifest.json").read_text())
    assert manifest["counts"]["written"] == args.images, manifest["counts"]

    result = {
        "images": args.images,
        "cpus": os.cpu_count(),
        "st_encode_img_per_s": args.images / st_s,
        "mmembed_img_per_s": args.images / mm_s,
        "ratio_mmembed_over_st": st_s / mm_s,
        "startup_s_cold_16_images": startup_s,
        "resources": manifest["resources"],
    }
    print("\nbenchmarks/embed_cpu.py  (tiny CLIP, 640x480 JPEG, CPU only)")
    print(f"  images                      {args.images}")
    print(f"  ST encode (decode+encode)   {result['st_encode_img_per_s']:8.1f} img/s   ({st_s:.1f} s)")
    print(f"  mmembed end to end          {result['mmembed_img_per_s']:8.1f} img/s   ({mm_s:.1f} s)")
    print(f"  ratio mmembed / ST          {result['ratio_mmembed_over_st']:8.2f}   (target >= 1.0)")
    print(f"  startup (cold, 16 images)   {startup_s:8.1f} s     (target < 10 s)")
    print(f"  actors                      {manifest['resources']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
