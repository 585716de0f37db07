"""The demo corpus (texts on a few topics, photo-like JPEGs, dashboard screenshots), generated
offline, and its top matches for a query: what `mmembed demo`, the notebooks and tests run on."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import numpy as np

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


# ---------------------------------------------------------------------------------------------
# Corpora: synthetic photos (JPEG) and screenshots (PNG), written once into the work directory
# ---------------------------------------------------------------------------------------------
# Screen sizes the `mixed` corpus cycles through.
MIXED_SIZES = [
    (800, 600), (1024, 768), (1280, 800), (1366, 768), (1440, 900), (1600, 1000), (1920, 1080),
    (1920, 1200), (2560, 1440), (2560, 1600), (1200, 1600), (900, 1600),
]  # fmt: skip


def make_photo(i: int, w: int = 640, h: int = 480) -> bytes:
    """A photo-like JPEG: smooth colour fields, sensor noise and a few solid shapes."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 6.28, 3)
    rgb = [127 + 100 * np.sin(xx / (40 + 30 * k) + yy / (55 + 20 * k) + phase[k]) for k in range(3)]
    arr = np.stack(rgb, -1) + rng.normal(0, 10, (h, w, 3))
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(10):
        x, y = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        s = int(rng.integers(20, 160))
        draw.rectangle([x, y, x + s, y + s // 2], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_screenshot(i: int, w: int = 1280, h: int = 800) -> bytes:
    """A UI-like PNG: a title bar, rows of words and a few coloured panels."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(100_000 + i)
    img = Image.new("RGB", (w, h), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, w, 40], fill=(35, 55, 95))
    for y in range(56, h - 16, 20):
        x = 16 + int(rng.integers(0, 3)) * 24
        while x < w - 120:
            k = int(rng.integers(2, 11))
            draw.text((x, y), "".join(chr(c) for c in rng.integers(97, 123, k)), fill=(30, 30, 30))
            x += 7 * k + 9
        if rng.random() < 0.04:
            draw.rectangle([w // 3, y, w // 3 + 320, y + 90], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _write_item(job) -> int:
    path, kind, i = job
    if kind == "photos":
        data = make_photo(i)
    elif kind == "shots":
        data = make_screenshot(i)
    else:
        w, h = MIXED_SIZES[i % len(MIXED_SIZES)]
        data = make_screenshot(i, w, h)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def corpus(root: str, kind: str, count: int, pool, unique: int | None = None) -> list[str]:
    """`count` files of one kind under root/kind (made once, reused by later runs).

    Only the first `unique` are generated; the rest are hard links to them under their own names,
    so a long end-to-end run (long enough for a steady rate) costs no generation time. Every file
    is still fetched, decoded and preprocessed on its own.
    """
    ext = ".jpg" if kind == "photos" else ".png"
    unique = min(count, unique or count)
    # Generated files live in one pool per kind, shared by every corpus of that kind.
    made = os.path.join(root, "corpus", f"{kind}-made")
    os.makedirs(made, exist_ok=True)
    sources = [os.path.join(made, f"{kind[0]}{i:06d}{ext}") for i in range(unique)]
    missing = [(p, kind, i) for i, p in enumerate(sources) if not os.path.exists(p)]
    if missing:
        pool.map(_write_item, missing, chunksize=8)
    directory = os.path.join(root, "corpus", f"{kind}-{count}-{unique}")
    paths = [os.path.join(directory, f"{kind[0]}{i:06d}{ext}") for i in range(count)]
    if not os.path.exists(os.path.join(directory, ".done")):
        os.makedirs(directory, exist_ok=True)
        for i, path in enumerate(paths):
            if not os.path.exists(path):
                os.link(sources[i % unique], path)
        open(os.path.join(directory, ".done"), "w").close()
    return paths


# ---------------------------------------------------------------------------------------------
# Documents and shards: the same pictures as PDF pages and as WebDataset tar members
# ---------------------------------------------------------------------------------------------
def make_pdf(images: list[bytes]) -> bytes:
    """A PDF with one page per image, written by Pillow at 72 dpi: a w x h image is a page of
    w x h points, so a page is the image's size. Pillow stores RGB pages as JPEG (DCTDecode)."""
    from PIL import Image

    pages = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    buf = io.BytesIO()
    pages[0].save(buf, "PDF", save_all=True, append_images=pages[1:], resolution=72.0)
    return buf.getvalue()


def _write_pdf(job) -> int:
    path, sources = job
    pictures = []
    for source in sources:
        with open(source, "rb") as f:
            pictures.append(f.read())
    data = make_pdf(pictures)
    with open(path + ".part", "wb") as f:
        f.write(data)
    os.replace(path + ".part", path)
    return len(data)


def pdf_corpus(root: str, sources: list[str], pages: int, pool) -> list[str]:
    """PDFs of `pages` pages each, page k of document d being sources[(d * pages + k) % len(sources)]
    (made once under root/corpus, reused by later runs): len(sources) // pages documents, at least one."""
    count = max(1, len(sources) // pages)
    directory = os.path.join(root, "corpus", f"pdf-{os.path.basename(os.path.dirname(sources[0]))}-{pages}p")
    paths = [os.path.join(directory, f"d{d:06d}.pdf") for d in range(count)]
    if not os.path.exists(os.path.join(directory, ".done")):
        os.makedirs(directory, exist_ok=True)
        jobs = [(p, [sources[(d * pages + k) % len(sources)] for k in range(pages)])
                for d, p in enumerate(paths) if not os.path.exists(p)]
        if jobs:
            pool.map(_write_pdf, jobs, chunksize=1)
        open(os.path.join(directory, ".done"), "w").close()
    return paths
