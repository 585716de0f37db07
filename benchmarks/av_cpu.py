"""Video and audio preprocessing in mmembed's CPU pool vs SentenceTransformer.encode, in one run.

    .venv/bin/python benchmarks/av_cpu.py [--videos 12 --video-seconds 8 --audios 48]

Workloads, generated on the spot into a temporary directory:
- video: H.264 clips (320x240, 30 fps) for a tiny Qwen3-VL embedder (its processor samples at
  most 4 frames at 2 fps);
- audio: 2 s stereo 44.1 kHz WAV tones for a tiny CLAP (48 kHz mono input).

Measured on one CPU worker (torch at 1 thread, torchcodec's default of 1 FFmpeg thread, for both
sides), on the same files. The headline ratio is mmembed's preprocess against ST's own
preprocess: the same work (decode, sample, process), no forward pass on either side.
  mmembed pre   PreprocessStage.__call__ on record batches (read file, torchcodec decode with
                seeking, resample, processor, pack to Arrow): what one preprocess actor sustains;
  st encode     SentenceTransformer.encode(paths) one clip per call, the user's baseline (ST
                decodes, samples or mixes down, preprocesses and runs the forward pass);
  st pre        SentenceTransformer.preprocess on the same inputs (no forward pass), for context;
  full decode   decoding every frame of each video with torchcodec, which is what a decoder
                without seeking pays before it can sample.
The weights are tiny, so the forward pass is negligible and the numbers are decode-bound. The
pipeline's embeddings of the first clips are checked against ST's (max |diff|) in the same run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_videos(root: Path, n: int, seconds: float) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"clip-{i:03d}.mp4"
        subprocess.run(
            ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
             "-i", f"testsrc2=size=320x240:rate=30:duration={seconds + 0.1 * i}",
             "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", str(p)],
            check=True,
        )  # fmt: skip
        paths.append(p)
    return paths


def make_tones(root: Path, n: int) -> list[Path]:
    import torch
    from torchcodec.encoders import AudioEncoder

    root.mkdir(parents=True, exist_ok=True)
    paths = []
    t = torch.arange(88_200, dtype=torch.float32) / 44_100
    for i in range(n):
        p = root / f"tone-{i:03d}.wav"
        freq = 200 + 15 * i
        wave = torch.stack([0.4 * torch.sin(2 * torch.pi * freq * t), 0.3 * torch.sin(2 * torch.pi * 1.5 * freq * t)])
        AudioEncoder(wave, sample_rate=44_100).to_file(str(p))
        paths.append(p)
    return paths


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def bench_pipeline(model_dir: str, column: str, paths: list[Path], batch: int = 8):
    """clips/s of one PreprocessStage, plus its embeddings of the first clips via EncodeStage."""
    import pyarrow as pa

    from mmembed.models.loading import ModelSpec
    from mmembed.stages.encode import EncodeStage
    from mmembed.stages.preprocess import PreprocessStage
    from mmembed.stages.read import normalize_manifest_table

    spec = ModelSpec(model_dir)
    stage = PreprocessStage(spec)
    table = normalize_manifest_table(
        pa.table({"id": [p.name for p in paths], column: [str(p) for p in paths]}), ""
    )
    stage(table.slice(0, 1))  # warm-up: lazy imports and first-call allocations stay out of the rate
    start = time.perf_counter()
    outs = [stage(table.slice(i, batch)) for i in range(0, table.num_rows, batch)]
    elapsed = time.perf_counter() - start
    errors = [e for o in outs for e in o.column("error").to_pylist() if e]
    if errors:
        raise SystemExit(f"preprocess errors: {errors[:3]}")
    check = EncodeStage(spec, device="cpu")(outs[0].slice(0, 3))
    return rate(len(paths), elapsed), check.column("embedding").to_pylist()


def bench_st(model_dir: str, inputs: list):
    import numpy as np
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model_dir, device="cpu")
    st.encode([inputs[0]])  # warm-up, as for the pipeline
    start = time.perf_counter()
    for x in inputs:
        st.preprocess([x])
    pre = rate(len(inputs), time.perf_counter() - start)
    start = time.perf_counter()
    embs = [st.encode([x])[0] for x in inputs]
    enc = rate(len(inputs), time.perf_counter() - start)
    return pre, enc, np.stack(embs)


def bench_full_decode(paths: list[Path]) -> float:
    from torchcodec.decoders import VideoDecoder

    VideoDecoder(str(paths[0]), num_ffmpeg_threads=1)[0]
    start = time.perf_counter()
    for p in paths:
        d = VideoDecoder(str(p), num_ffmpeg_threads=1)
        d.get_frames_in_range(0, len(d))
    return rate(len(paths), time.perf_counter() - start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=12, help="Number of video clips (default: 12).")
    ap.add_argument("--video-seconds", type=float, default=8.0, help="Length of the first clip (default: 8 s).")
    ap.add_argument("--audios", type=int, default=48, help="Number of 2 s audio clips (default: 48).")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(1)  # one preprocess actor's share

    from mmembed.testing import tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        qwen = tiny_model("qwen3vl_embedder", root / "models")
        clap = tiny_model("clap", root / "models")
        videos = make_videos(root / "videos", args.videos, args.video_seconds)
        tones = make_tones(root / "audio", args.audios)

        v_pipe, v_emb = bench_pipeline(qwen, "video", videos)
        v_pre, v_enc, v_ref = bench_st(qwen, [str(p) for p in videos])
        v_full = bench_full_decode(videos)
        a_pipe, a_emb = bench_pipeline(clap, "audio", tones)
        a_pre, a_enc, a_ref = bench_st(clap, [str(p) for p in tones])

        v_diff = float(np.abs(np.asarray(v_emb) - v_ref[: len(v_emb)]).max())
        a_diff = float(np.abs(np.asarray(a_emb) - a_ref[: len(a_emb)]).max())
        print(f"\nvideo: {len(videos)} clips, {args.video_seconds:g}-{args.video_seconds + 0.1 * (len(videos) - 1):g} s, "
              "320x240 @ 30 fps, H.264; tiny Qwen3-VL (<= 4 sampled frames)")  # fmt: skip
        print(f"  mmembed preprocess (1 actor)  {v_pipe:8.2f} clips/s")
        print(f"  ST preprocess only            {v_pre:8.2f} clips/s   ratio mmembed / ST preprocess x{v_pipe / v_pre:.2f}")
        print(f"  ST encode                     {v_enc:8.2f} clips/s   (with the forward pass, context: x{v_pipe / v_enc:.2f})")
        print(f"  full decode, no seeking       {v_full:8.2f} clips/s")
        print(f"  parity: max |diff| vs ST on {len(v_emb)} clips = {v_diff:.2e}")
        print(f"audio: {len(tones)} clips, 2 s stereo 44.1 kHz WAV -> 48 kHz mono; tiny CLAP")
        print(f"  mmembed preprocess (1 actor)  {a_pipe:8.2f} clips/s")
        print(f"  ST preprocess only            {a_pre:8.2f} clips/s   ratio mmembed / ST preprocess x{a_pipe / a_pre:.2f}")
        print(f"  ST encode                     {a_enc:8.2f} clips/s   (with the forward pass, context: x{a_pipe / a_enc:.2f})")
        print(f"  parity: max |diff| vs ST on {len(a_emb)} clips = {a_diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
