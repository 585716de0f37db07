"""The demo corpus (texts on a few topics, photo-like JPEGs, dashboard screenshots), generated
offline, and its top matches for a query: what `mmembed demo`, the notebooks and tests run on."""

from __future__ import annotations

import random
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
