"""Fixtures the benchmarks share: generated corpora, full-size random-weight models, and the
steady-rate reading of an embed job's shards.

- corpora: photo-like JPEGs (640x480), UI-like screenshots (1280x800 PNG) and screenshots of
  mixed sizes, generated once into a work directory by a process pool and reused by later runs
  (`corpus`);
- models: mmembed's tiny test models (mmembed.testing) grown to the real shapes of CLIP B/32,
  CLIP L/14 and Qwen3-VL-2B with random weights, or kept tiny for smoke runs (`build_model`);
- `steady_rate`: rows per second while an embed job's shards stream out;
- documents and S3: PDFs with one screenshot per page (`pdf_corpus`), and a moto S3 server for a
  benchmark's own run (`moto_s3`, `s3_bucket`; clients from mmembed/testing/moto.py); tar shards
  come from mmembed/testing/shards.py.

benchmarks/gpu.py and benchmarks/feed.py use them. Imports stay light (numpy at import; Pillow,
torch and transformers inside the functions that need them): gpu.py runs on a bare GPU node.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import numpy as np

# ---------------------------------------------------------------------------------------------
# Model shapes
# ---------------------------------------------------------------------------------------------
CLIP_SHAPES = {
    # (vision tower, text tower, projection) as in openai/clip-vit-base-patch32 / -large-patch14
    "b32": (
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=32),
        dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        512,
    ),
    "l14": (
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14),
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        768,
    ),
}
TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)

# Qwen3-VL-2B (the backbone of Qwen3-VL-Embedding-2B).
QWEN_TEXT = dict(
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=32768,
    initializer_range=0.02,
)
QWEN_MROPE = [24, 20, 20]  # covers head_dim / 2 = 64 rotary pairs
QWEN_VISION = dict(
    depth=24,
    hidden_size=1024,
    intermediate_size=4096,
    num_heads=16,
    out_hidden_size=2048,
    deepstack_visual_indexes=[5, 11, 17],
    num_position_embeddings=2304,
    initializer_range=0.02,
)
QWEN_MAX_PIXELS = 360_000
QWEN_MIN_PIXELS = 64 * 32 * 32


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


# Dummy credentials the moto server accepts (as tests/s3_fixtures.py).
MOTO_KEY, MOTO_SECRET, MOTO_REGION = "AKIAMMEMBEDBENCHKEY1", "mmembed-bench-secret", "us-east-1"


@contextlib.contextmanager
def moto_s3(timeout_s: float = 60.0):
    """A moto S3 server (mmembed/testing/moto.py) for the duration of the block; yields fsspec storage
    options (endpoint, dummy credentials)."""
    from mmembed.testing.moto import moto_process, storage_options

    with moto_process(MOTO_KEY, MOTO_SECRET, MOTO_REGION, timeout_s) as (endpoint, _):
        yield storage_options(endpoint, MOTO_KEY, MOTO_SECRET, MOTO_REGION)


def s3_bucket(storage_options: dict, bucket: str) -> None:
    """Make `bucket` on `moto_s3`'s server unless it is there."""
    from mmembed.testing.moto import boto3_client

    client = boto3_client(storage_options)
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)


# ---------------------------------------------------------------------------------------------
# Models: mmembed's tiny test models grown to the real shapes
# ---------------------------------------------------------------------------------------------
def _processor_config(path: str) -> tuple[str, dict, dict]:
    """The saved image-processor settings, wherever this transformers version keeps them."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        file = os.path.join(path, name)
        if os.path.exists(file):
            with open(file) as f:
                whole = json.load(f)
            return file, whole, whole.get("image_processor", whole)
    raise FileNotFoundError(f"no image processor config in {path}")


def _replace_weights(path: str, model) -> None:
    for name in os.listdir(path):
        if name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".json")):
            os.remove(os.path.join(path, name))
    model.save_pretrained(path)


def build_model(root: str, name: str, smoke: bool, dtype: str, device: str) -> str:
    """An ST model directory for `name` (clip_b32 | clip_l14 | qwen3vl), built once."""
    import torch

    from mmembed.testing import tiny_model

    path = os.path.join(root, "models", f"{name}-{'smoke' if smoke else 'full'}-{dtype}")
    if os.path.exists(os.path.join(path, ".full")):
        return path
    shutil.rmtree(path, ignore_errors=True)
    tiny = tiny_model("clip" if name.startswith("clip") else "qwen3vl_embedder", os.path.join(root, "tiny"))
    shutil.copytree(tiny, path)
    torch_dtype = getattr(torch, dtype)
    # Random init runs on the GPU when there is one: a 2B model initialises in seconds there.
    init_device = "cuda" if device == "cuda" else "cpu"
    if name.startswith("clip"):
        from transformers import CLIPConfig, CLIPModel

        vision, text, proj = CLIP_SHAPES[name.split("_")[1]]
        if smoke:
            vision, text, proj = {**TINY_TOWER, "patch_size": 32}, TINY_TOWER, 16
        cfg = CLIPConfig.from_pretrained(path)
        cfg.text_config.update({**text, "projection_dim": proj, "initializer_factor": 1.0})
        cfg.vision_config.update({**vision, "image_size": 224, "projection_dim": proj, "initializer_factor": 1.0})
        cfg.projection_dim, cfg.initializer_factor = proj, 1.0
        with torch.device(init_device):
            model = CLIPModel(cfg).to(torch_dtype)
        _replace_weights(path, model)
        file, whole, ip = _processor_config(path)
        ip["size"] = {"shortest_edge": 224}
        ip["crop_size"] = {"height": 224, "width": 224}
    else:
        from transformers import Qwen3VLConfig, Qwen3VLModel

        cfg = Qwen3VLConfig.from_pretrained(path)
        if not smoke:
            cfg.text_config.update(QWEN_TEXT)
            cfg.text_config.rope_parameters = {**cfg.text_config.rope_parameters, "mrope_section": QWEN_MROPE}
            cfg.vision_config.update(QWEN_VISION)
        else:
            cfg.text_config.update(dict(initializer_range=0.02))
            cfg.vision_config.update(dict(initializer_range=0.02, num_position_embeddings=2304))
        with torch.device(init_device):
            model = Qwen3VLModel(cfg).to(torch_dtype)
        _replace_weights(path, model)
        file, whole, ip = _processor_config(path)
        ip["size"] = {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS}
        # The pooling module declares the embedding width (get_embedding_dimension): grow it with
        # the backbone, or the encode stage sizes its output for the tiny model's width.
        pooling = os.path.join(path, "1_Pooling", "config.json")
        with open(pooling) as f:
            pool_cfg = json.load(f)
        for key in ("embedding_dimension", "word_embedding_dimension"):
            if key in pool_cfg:
                pool_cfg[key] = cfg.text_config.hidden_size
        with open(pooling, "w") as f:
            json.dump(pool_cfg, f, indent=2)
    with open(file, "w") as f:
        json.dump(whole, f, indent=2)
    del model
    open(os.path.join(path, ".full"), "w").close()
    return path


# ---------------------------------------------------------------------------------------------
# Reading an embed job's output
# ---------------------------------------------------------------------------------------------
def steady_rate(out_dir: str, files: list[dict], wall_s: float) -> float | None:
    """Rows per second while shards stream out, from their modification times.

    Shards are renamed into place as they complete; the first 10% of rows (pipeline fill) are
    left out so the figure is the sustained rate a corpus-scale run sees. None when the shards
    did not stream (a corpus small enough to come out in one burst says nothing about a rate).
    """
    stamps = sorted((os.stat(os.path.join(out_dir, f["name"])).st_mtime, f["rows"]) for f in files)
    if len(stamps) < 4:
        return None
    total = sum(r for _, r in stamps)
    cum, k = 0, 0
    for k, (_, rows) in enumerate(stamps):
        cum += rows
        if cum >= 0.1 * total:
            break
    span = stamps[-1][0] - stamps[k][0]
    if span < 0.2 * wall_s:
        return None
    return (total - cum) / span
