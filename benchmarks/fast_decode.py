"""`--fast-decode` (Pillow's JPEG draft: DCT-domain downscaling to no less than the processor's target) against
a full decode, on the same photos, in one run.

    .venv/bin/python benchmarks/fast_decode.py [--photos 48] [--pairs 3] [--json OUT]

For each photo size (640x480, the corpus photos; 2016x1512, a phone photo at half its sensor size), one
process, one thread, alternating A/B for --pairs rounds:
- full: `decode_image` as ST decodes (a full Pillow decode), then the CLIP processor (fast class) to 224;
- draft: `decode_image(..., draft_edge=224)`, then the same processor.
Rate ratio draft / full (median of the pairs). Equality: the cosine between ST's embeddings of the two
decodes, with a CLIP ViT-B/32-shaped model (mmembed/testing/shapes.py; random weights, as every model this
machine can build: a real CLIP's cosine is for a device run with its weights), and the largest difference of
the processor's pixel_values.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = [(640, 480), (2016, 1512)]


def main(argv=None) -> int:
    a = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--photos", type=int, default=48)
    a.add_argument("--pairs", type=int, default=3)
    a.add_argument("--workdir", default=None)
    a.add_argument("--json", default=None)
    a.add_argument("--smoke", action="store_true")
    args = a.parse_args(argv)
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from PIL import Image
    from sentence_transformers import SentenceTransformer
    from transformers import AutoImageProcessor

    from mmembed.media.decode import decode_image
    from mmembed.testing.corpus import make_photo
    from mmembed.testing.shapes import build_model

    torch.set_num_threads(1)
    photos = 4 if args.smoke else args.photos
    work = args.workdir or tempfile.mkdtemp(prefix="fast-decode-")
    model_dir = build_model(work, "clip_b32", args.smoke, "float32", "cpu")
    processor = AutoImageProcessor.from_pretrained(model_dir, backend="torchvision")
    edge = processor.size.shortest_edge
    st = SentenceTransformer(model_dir, device="cpu")
    results = {}
    for w, h in SIZES:
        files = []
        for i in range(photos):
            buf = io.BytesIO()
            Image.open(io.BytesIO(make_photo(i, w, h))).save(buf, "JPEG", quality=90)
            files.append(buf.getvalue())

        def run(draft):
            t = time.perf_counter()
            for data in files:
                processor(images=[decode_image(data, max_pixels=10**9, draft_edge=edge if draft else None)],
                          return_tensors="pt")
            return len(files) / (time.perf_counter() - t)

        run(False), run(True)  # warm
        pairs = [(run(False), run(True)) for _ in range(1 if args.smoke else args.pairs)]
        full = [decode_image(d, max_pixels=10**9) for d in files]
        draft = [decode_image(d, max_pixels=10**9, draft_edge=edge) for d in files]
        a_emb = st.encode(full, convert_to_numpy=True, normalize_embeddings=True)
        b_emb = st.encode(draft, convert_to_numpy=True, normalize_embeddings=True)
        cos = (a_emb * b_emb).sum(axis=1)
        # How much a random-weight model's embedding moves at all: the cosine between different photos.
        between = float((a_emb[:-1] * a_emb[1:]).sum(axis=1).mean())
        diffs = [(processor(images=[x], return_tensors="pt")["pixel_values"]
                  - processor(images=[y], return_tensors="pt")["pixel_values"]).abs() for x, y in zip(full[:8], draft[:8])]
        px = max(float(d.max()) for d in diffs)
        px_mean = float(sum(float(d.mean()) for d in diffs) / len(diffs))
        results[f"{w}x{h}"] = {
            "decoded_size": list(draft[0].size),
            "full_per_s": [round(f, 1) for f, _ in pairs], "draft_per_s": [round(d, 1) for _, d in pairs],
            "ratio": round(statistics.median(d / f for f, d in pairs), 3),
            "cosine_mean": round(float(cos.mean()), 5), "cosine_min": round(float(cos.min()), 5),
            "max_pixel_value_diff": round(px, 4), "mean_pixel_value_diff": round(px_mean, 4),
            "cosine_between_different_photos": round(between, 5),
        }
        r = results[f"{w}x{h}"]
        print(f"{w}x{h} JPEG -> draft {r['decoded_size'][0]}x{r['decoded_size'][1]} (target edge {edge}): "
              f"full {r['full_per_s']}/s, draft {r['draft_per_s']}/s, draft/full {r['ratio']}; "
              f"cosine to ST mean {r['cosine_mean']} min {r['cosine_min']} (different photos: {between:.5f}); "
              f"pixel_values diff max {px:.3f} mean {px_mean:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
