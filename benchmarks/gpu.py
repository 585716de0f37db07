"""GPU throughput of mmembed against sentence-transformers, measured in one run.

    bash ../shared/device/pack.sh && bash benchmarks/pack_nvimgcodec.sh        # here: what the GPU node lacks
    source .device/activate.sh && python benchmarks/gpu.py --out $OUT/bench     # GPU node (<= 9 min: --budget-s)
    python benchmarks/gpu.py --smoke --out /tmp/bench                           # CPU, tiny shapes

For each workload, on the same files and the same model directory:
  st       SentenceTransformer.encode(paths), the user's baseline (decode + preprocess + forward, serial);
  forward  the encode stage's own forward (EncodeStage.embed) on batches already on the device:
           the GPU ceiling;
  pre      the preprocess stage (fetch + decode + processor + pack) in a process pool on every core:
           the CPU ceiling;
  e2e      `mmembed embed` (mmembed.cli.main) from files on local disk to Parquet on local disk.
           `steady` is the rate while shards stream out (file modification times, the first 10% of
           rows excluded), so actor start-up and model loading are left out; `wall` includes them.
           When a run is too short for shards to stream, `window` (rows over the encoders' own
           window, first call to last, from the manifest's device_use) stands in for `steady`.
           The manifest's device_use also gives the encoders' forward time over their wall time
           and, through NVML, the GPU's utilisation; the benchmark samples NVML itself too.
  decode   for --decode-on-device workloads, the encoder's device decode + processor alone, in this
           process (the third ceiling such a run can meet).

Steady state within a device budget (issue 28): every end-to-end job is sized from the ceilings this
run measured (1.2 x the lowest, times --stream-seconds, default 30), so its shards stream for at least
that long, and its rate is read from the shards' times (and the encoders' windows), never the wall
clock. Workloads run in priority order; one whose estimated time no longer fits --budget-s (540) is
skipped and said so. The default set: Qwen3-VL with one encoder per GPU (calls on their own CUDA
streams) against two encoder processes, and with --compile; CLIP B/32 and L/14 with CPU decode and with
device decode by torchvision's nvJPEG and by nvImageCodec (skipped, and said so, where not installed).

Models have random weights in the real shapes (compute does not depend on the weights); they are
the tiny test models of mmembed.testing grown to full size, so ST loads them through its usual
path (mmembed/testing/shapes.py; corpora: mmembed/testing/corpus.py; the st, forward and pre
baselines: mmembed/testing/baselines.py). Parity is checked in the same run: the cosine between
mmembed's and ST's embeddings of the same files must be >= --min-cosine (0.999) in the run's dtype.

Writes results.json and throughput.png under --out, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from mmembed.testing.baselines import (  # noqa: E402 - the same-run baselines, corpora, models, rates
    forward_only,
    free_device,
    init_worker,
    parity,
    pool_preprocess,
    preprocess_job,
    st_encode,
)
from mmembed.testing.corpus import corpus  # noqa: E402
from mmembed.testing.rates import GpuSampler, environment, steady_rate, usable_cpus  # noqa: E402
from mmembed.testing.shapes import build_model  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------
@dataclass
class Workload:
    name: str
    model: str  # clip_b32 | clip_l14 | qwen3vl
    corpus: str  # photos | shots | mixed
    n_e2e: int  # files mmembed embeds end to end
    n_st: int  # of those, files ST encodes (also the parity subset)
    n_pre: int  # files the CPU pool preprocesses
    n_fwd: int  # rows the forward-only ceiling cycles through
    batch_size: int
    st_batch_size: int
    extra: list = field(default_factory=list)  # more `mmembed embed` options
    max_batch_tokens: int | None = None
    encode_window: int | None = None
    decode_on_device: bool = False  # --decode-on-device: the CPU pool only fetches; JPEGs decode on the GPU
    device_decoder: str | None = None  # with decode_on_device: torchvision | nvimgcodec
    compile: bool = False  # --compile for this workload's e2e and forward-only ceiling
    startup_s: float = 30.0  # a guess at the job's start (actors, weights) for the budget


def workloads(smoke: bool, scale: float, cpus: int) -> dict[str, Workload]:
    """In priority order: the budget skips from the end. n_e2e is a cap; the run sizes each job from its ceilings."""
    def n(full: int, tiny: int) -> int:
        return tiny if smoke else max(8, int(full * scale))

    # CLIP with CPU decode is bound by the CPUs: every core to preprocessing, the encoder light.
    clip_cpu = [
        "--num-preprocessors", str(cpus),
        "--cpus-per-preprocessor", str(round(max(0.1, (cpus - 1.5 - 1.0) / cpus), 3)),
        "--cpus-per-encoder", "0.5",
    ]  # fmt: skip
    two_per_gpu = ["--gpus-per-encoder", "0.5"]
    pre_batch = ["--preprocess-batch-size", "64" if not smoke else "8"]
    qwen = dict(max_batch_tokens=32 * 384 if not smoke else 4 * 384, encode_window=128 if not smoke else 8)
    qwen_extra = ["--preprocess-batch-size", "8" if not smoke else "4"]

    def clip(name, model, decoder=None, cap=200_000):
        batch = (512 if model == "clip_b32" else 256) if not smoke else 8
        extra = (["--cpus-per-encoder", "2"] if decoder else clip_cpu) + pre_batch
        return Workload(name, model, "photos", n(cap, 24), n(512, 8), n(4096, 16), n(512, 8), batch,
                        128 if not smoke else 8, extra=extra, decode_on_device=decoder is not None,
                        device_decoder=decoder, startup_s=25.0)

    out = [
        Workload("qwen3vl_one", "qwen3vl", "shots", n(20_000, 8), n(64, 4), n(512, 8), n(64, 4),
                 32 if not smoke else 4, 32 if not smoke else 4, extra=qwen_extra, startup_s=45.0, **qwen),
        clip("clip_l14", "clip_l14", cap=60_000),
        clip("clip_b32", "clip_b32"),
        clip("clip_b32_nvdecode", "clip_b32", "nvimgcodec", cap=400_000),
        clip("clip_b32_tvdecode", "clip_b32", "torchvision", cap=400_000),
        Workload("qwen3vl_two", "qwen3vl", "shots", n(20_000, 8), n(64, 4), n(512, 8), n(64, 4),
                 32 if not smoke else 4, 32 if not smoke else 4, extra=two_per_gpu + qwen_extra, startup_s=60.0,
                 **qwen),
        clip("clip_l14_nvdecode", "clip_l14", "nvimgcodec", cap=60_000),
        clip("clip_l14_tvdecode", "clip_l14", "torchvision", cap=60_000),
        Workload("qwen3vl_compile", "qwen3vl", "shots", n(20_000, 8), n(64, 4), n(512, 8), n(64, 4),
                 32 if not smoke else 4, 32 if not smoke else 4, extra=qwen_extra, compile=True, startup_s=150.0,
                 **qwen),
        # Not in the default set: screenshots and photos mixed (sizes vary within a batch).
        Workload("qwen3vl_mixed", "qwen3vl", "mixed", n(4_000, 8), n(64, 4), n(256, 8), n(128, 8),
                 32 if not smoke else 4, 32 if not smoke else 4, extra=qwen_extra, startup_s=45.0, **qwen),
    ]
    return {w.name: w for w in out}


DEFAULT_WORKLOADS = ("qwen3vl_one,clip_l14,clip_b32,clip_b32_nvdecode,clip_b32_tvdecode,qwen3vl_two,"
                     "clip_l14_nvdecode,clip_l14_tvdecode,qwen3vl_compile")


def e2e_size(w: Workload, r: dict, stream_s: float, smoke: bool) -> int:
    """Records for a job whose shards stream for at least `stream_s`: 1.2 x the lowest ceiling this run measured
    (CPU pool, forward, device decode) times the time, the first 10% of rows (pipeline fill) added; at most n_e2e."""
    if smoke:
        return w.n_e2e
    ceilings = [r[k]["img_s"] for k in ("pre", "forward", "decode") if r.get(k, {}).get("img_s")]
    if not ceilings:
        return w.n_e2e
    return max(64, min(w.n_e2e, int(1.2 * min(ceilings) * stream_s / 0.9)))


def device_decode_ceiling(model_dir: str, paths: list[str], decoder: str, device: str, batch: int,
                          min_seconds: float, model_kwargs: dict, shares: list[float] = ()) -> dict:
    """The encoder's device decode and processor alone (DeviceImageDecoder), batches of `batch` files, in this
    process: what a --decode-on-device run can reach at most, whatever else keeps up. With nvImageCodec and
    `shares`, also its rate at each --hw-decode-share (a shorter window each): what sets the option's default."""
    import numpy as np
    import torch

    from mmembed.media.device_decode import DeviceImageDecoder
    from mmembed.models.loading import ModelSpec, load_model
    from mmembed.testing.baselines import sync_device

    model = load_model(ModelSpec(model_dir, model_kwargs=model_kwargs), weights=False)
    data = [np.frombuffer(open(p, "rb").read(), dtype=np.uint8) for p in paths]
    chunks = [data[i:i + batch] for i in range(0, len(data), batch)]
    dev = torch.device(device)

    def rate(hw_share: float | None, seconds: float) -> float:  # None: the decoder's default share
        decode = DeviceImageDecoder(model, decoder=decoder, **({} if hw_share is None else {"hw_share": hw_share}))
        decode(chunks[0], dev)
        sync_device(device)
        done, start = 0, time.perf_counter()
        while True:
            for chunk in chunks:
                decode(chunk, dev)
                done += len(chunk)
            sync_device(device)
            if time.perf_counter() - start >= seconds:
                return done / (time.perf_counter() - start)

    out = {"img_s": rate(None, min_seconds), "decoder": decoder, "batch": batch}
    if decoder == "nvimgcodec" and shares:
        out["hw_share_sweep"] = {str(share): rate(share, min(min_seconds, 2.0)) for share in shares}
    return out


def e2e(w: Workload, model_dir: str, paths: list[str], root: str, out_dir: str, args, model_kwargs: dict) -> dict:
    import pyarrow.parquet as pq

    from mmembed import cli

    input_dir = os.path.dirname(paths[0])
    shutil.rmtree(out_dir, ignore_errors=True)
    argv = [
        "--input", input_dir, "--output", out_dir, "--model", model_dir,
        "--batch-size", str(w.batch_size),
        "--model-kwargs", json.dumps(model_kwargs),
        "--shard-rows", str(max(4, w.n_e2e // 40)),
        "--device", args.device,
    ]  # fmt: skip
    if args.transport_dtype and args.transport_dtype != "job":
        argv += ["--transport-dtype", args.transport_dtype]
    if w.max_batch_tokens:
        argv += ["--max-batch-tokens", str(w.max_batch_tokens)]
    if w.encode_window:
        argv += ["--encode-window", str(w.encode_window)]
    if w.decode_on_device:
        argv += ["--decode-on-device", "--device-decoder", w.device_decoder or "auto"]
    if args.compile or w.compile:
        argv += ["--compile"]
    extra = list(w.extra)
    if args.device != "cuda":
        extra = _drop_gpu_only(extra)
    argv += extra
    start, start_wall = time.perf_counter(), time.time()
    with GpuSampler() as gpu:
        rc = cli.main(["embed", *argv])
    wall = time.perf_counter() - start
    with open(os.path.join(out_dir, "_manifest.json")) as f:
        manifest = json.load(f)
    parts = [os.path.join(out_dir, f["name"]) for f in manifest["files"]]
    table = pq.ParquetFile(parts[0]).read() if len(parts) == 1 else _read_parts(parts)
    ids = table.column("id").to_pylist()
    emb = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    written = manifest["counts"]["written"]
    steady = steady_rate(out_dir, manifest["files"], wall)
    use = manifest.get("device_use") or {}
    # Utilisation from the first shard on leaves out actor start-up and model loading; shard
    # mtimes are wall-clock time, the sampler's stamps perf_counter: map one onto the other.
    mtimes = [os.stat(os.path.join(out_dir, f["name"])).st_mtime for f in manifest["files"]]
    first_shard = start + (min(mtimes) - start_wall) if mtimes else None
    # How long shards streamed (first to last): the steady rate's window, to hold against --stream-seconds.
    streamed = (max(mtimes) - min(mtimes)) if len(mtimes) > 1 else 0.0
    return {
        "rc": rc,
        "argv": argv,
        "written": written,
        "errors": manifest["counts"]["errors"],
        "wall_s": wall,
        "wall_img_s": written / wall,
        "steady_img_s": steady,
        "streamed_s": streamed,
        # Rows over the encoders' own window (first call to last, from the manifest): the rate
        # without start-up, measurable when a run is too short for the shard times to stream.
        "window_img_s": written / use["encode_window_s"] if use.get("encode_window_s") else None,
        "gpu": gpu.summary(first_shard),
        "device_use": manifest.get("device_use"),
        "resources": manifest.get("resources"),
        "by_id": dict(zip(ids, emb)),
    }


def _read_parts(parts):
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(p) for p in parts])


def _drop_gpu_only(extra: list[str]) -> list[str]:
    """On a CPU run, resource options meant for a GPU node do not fit: leave them to plan_resources."""
    out, skip = [], False
    for item in extra:
        if skip:
            skip = False
            continue
        if item in ("--gpus-per-encoder", "--num-preprocessors", "--cpus-per-preprocessor", "--cpus-per-encoder"):
            skip = True
            continue
        out.append(item)
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def summarise(r: dict) -> dict:
    e2e_rate = r["e2e"]["steady_img_s"] or r["e2e"].get("window_img_s") or r["e2e"]["wall_img_s"]
    limits = {"GPU": r["forward"]["img_s"], "CPU": r["pre"]["img_s"]}
    if r.get("decode"):
        limits["decode"] = r["decode"]["img_s"]
    limit = min(limits, key=limits.get)
    return {
        "e2e_img_s": e2e_rate,
        "e2e_over_st": e2e_rate / r["st"]["img_s"],
        "e2e_over_forward": e2e_rate / r["forward"]["img_s"],
        "e2e_over_ceiling": e2e_rate / limits[limit],
        "node_limit": limit,
    }


def table(results: dict, card: str) -> str:
    head = (
        f"{'workload':<19}{'ST':>9}{'forward':>10}{'CPU pre':>10}{'decode':>9}{'e2e':>9}{'streamed':>9}"
        f"{'e2e/ST':>8}{'e2e/fwd':>8}{'e2e/min':>9}{'limit':>7}{'min cos':>9}{'pad waste':>10}"
    )
    lines = [f"card: {card}  (img/s; e2e = steady rate from shard times, else rows over the encoders' window; "
             "streamed = seconds shards streamed; e2e/min = e2e / the lowest ceiling: forward, CPU pre, device decode)",
             head, "-" * len(head)]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:<19}FAILED: {r['error']}")
            continue
        if "skipped" in r:
            lines.append(f"{name:<19}skipped: {r['skipped']}")
            continue
        s = r["summary"]
        cos = r["parity"]["min_cosine"]
        waste = r.get("padding", {}).get("token_budget")
        decode = r.get("decode", {}).get("img_s")
        lines.append(
            f"{name:<19}{r['st']['img_s']:>9.1f}{r['forward']['img_s']:>10.1f}{r['pre']['img_s']:>10.1f}"
            f"{(f'{decode:.1f}' if decode else '-'):>9}{s['e2e_img_s']:>9.1f}{r['e2e']['streamed_s']:>9.0f}"
            f"{s['e2e_over_st']:>8.2f}{s['e2e_over_forward']:>8.2f}{s['e2e_over_ceiling']:>9.2f}{s['node_limit']:>7}"
            f"{(f'{cos:.5f}' if cos is not None else 'n/a'):>9}{(f'{waste:.1%}' if waste is not None else '-'):>10}"
        )
    return "\n".join(lines)


def chart(results: dict, card: str, path: str) -> None:
    """Grouped bars per workload (each group on its own scale, values printed), drawn with Pillow."""
    from PIL import Image, ImageDraw

    series = [("ST encode", "st", (150, 150, 150)), ("mmembed e2e", "e2e", (30, 110, 200)),
              ("forward-only", "forward", (230, 140, 30)), ("CPU preprocess", "pre", (60, 160, 80))]  # fmt: skip
    ok = {k: v for k, v in results.items() if "summary" in v}
    group_w, bar_w, top, height = 260, 50, 70, 260
    img = Image.new("RGB", (max(1, len(ok)) * group_w + 40, top + height + 70), "white")
    draw = ImageDraw.Draw(img)
    draw.text((20, 10), f"images/s, same run - {card}", fill="black")
    for j, (label, _, color) in enumerate(series):
        draw.rectangle([20 + 150 * j, 35, 32 + 150 * j, 47], fill=color)
        draw.text((38 + 150 * j, 35), label, fill="black")
    base = top + height
    for g, (name, r) in enumerate(ok.items()):
        values = [r["summary"]["e2e_img_s"] if key == "e2e" else r[key]["img_s"] for _, key, _ in series]
        peak = max(values) or 1.0
        x0 = 30 + g * group_w
        for j, ((_, _, color), v) in enumerate(zip(series, values)):
            h = int(height * 0.85 * v / peak)
            x = x0 + j * (bar_w + 8)
            draw.rectangle([x, base - h, x + bar_w, base], fill=color)
            draw.text((x, base - h - 14), f"{v:,.0f}" if v >= 10 else f"{v:.1f}", fill="black")
        draw.text((x0, base + 8), name, fill="black")
        draw.text((x0, base + 24), f"e2e/ST {r['summary']['e2e_over_st']:.1f}x", fill="black")
        draw.text((x0, base + 40), f"e2e/limit {r['summary']['e2e_over_ceiling']:.2f}", fill="black")
    img.save(path)


# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="Where results.json and throughput.png go.")
    p.add_argument(
        "--workdir", default="/tmp/mmembed_gpu_bench", help="Models and corpora (reused by later runs)."
    )
    p.add_argument(
        "--workloads",
        default=DEFAULT_WORKLOADS,
        help="Comma-separated, run in this order (the budget skips from the end): qwen3vl_one (one encoder per "
        "GPU), qwen3vl_two (two encoder processes on it), qwen3vl_compile, qwen3vl_mixed, clip_b32, clip_l14, "
        "and clip_{b32,l14}_{nvdecode,tvdecode} (--decode-on-device by nvImageCodec / torchvision). "
        f"Default: {DEFAULT_WORKLOADS}.",
    )
    p.add_argument("--hw-shares", type=lambda v: [float(x) for x in v.split(",") if x.strip()],
                   default=[0.0, 0.5, 0.75, 1.0],
                   help="nvImageCodec decode ceilings at these --hw-decode-share values (default 0,0.5,0.75,1; '' "
                   "for none): what the option's default should be on this card.")
    p.add_argument("--stream-seconds", type=float, default=30.0,
                   help="Each end-to-end job is sized so its shards stream at least this long (default 30).")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="Seconds the whole run may take (default 540: 9 minutes of device time); a workload whose "
                   "estimated time no longer fits is skipped and reported.")
    p.add_argument("--smoke", action="store_true", help="Tiny shapes and corpora: a CPU check of the whole script.")
    p.add_argument("--scale", type=float, default=1.0, help="Multiply the corpus sizes (not in --smoke).")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="Device for ST and encoders.")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="Model weights dtype for ST and mmembed alike (default: bfloat16 on GPU, float32 on CPU).",
    )
    p.add_argument(
        "--transport-dtype",
        default="job",
        help="mmembed --transport-dtype for pixel tensors (default 'job': mmembed's own default, uint8 pixels and "
        "Qwen-VL frames where exact; 'auto' for the model dtype when it is 16-bit; 'none' for the processor's fp32).",
    )
    p.add_argument(
        "--attn",
        default="sdpa",
        choices=["sdpa", "eager", "flash_attention_2"],
        help="attn_implementation for ST and mmembed (flash_attention_2 needs the flash-attn package).",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile in the forward-only ceiling and e2e.")
    p.add_argument("--cpus", type=int, default=None, help="CPU pool size (default: every CPU of this machine).")
    p.add_argument("--min-cosine", type=float, default=0.999, help="Parity threshold against ST (default 0.999).")
    p.add_argument("--fwd-seconds", type=float, default=None, help="Time spent timing each forward-only ceiling.")
    p.add_argument(
        "--ray-num-cpus", type=int, default=None, help="num_cpus for the Ray runtime this script starts (default: all)."
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    # The forward-only ceiling feeds on float pixel rows in the model's dtype, whatever the job ships.
    sample_transport = args.dtype if args.dtype != "float32" else None
    if args.transport_dtype == "auto":
        args.transport_dtype = sample_transport
    elif args.transport_dtype in ("none", "job"):
        args.transport_dtype = "float32" if args.transport_dtype == "none" else "job"
    if args.attn == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            print("benchmarks/gpu.py: --attn flash_attention_2 needs the flash-attn package; use --attn sdpa", file=sys.stderr)
            return 2
    cpus = args.cpus or usable_cpus()
    fwd_seconds = args.fwd_seconds or (0.3 if args.smoke else 3.0)
    all_workloads = workloads(args.smoke, args.scale, cpus)
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in chosen if w not in all_workloads]
    if unknown:
        print(f"benchmarks/gpu.py: unknown workloads {unknown}; choose from {list(all_workloads)}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.workdir, exist_ok=True)
    env = environment(args.device)
    model_kwargs = {"dtype": args.dtype, "attn_implementation": args.attn}
    print(f"benchmark on {env['card']}, {cpus} CPUs, {args.dtype}; work dir {args.workdir}", flush=True)
    results: dict = {name: {} for name in chosen}
    t0 = time.perf_counter()

    def stamp(msg):
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    def fail(name, phase, exc):
        import traceback

        results[name]["error"] = f"{phase}: {type(exc).__name__}: {exc}"
        results[name]["traceback"] = traceback.format_exc()[-4000:]
        stamp(f"{name}: {phase} FAILED {type(exc).__name__}: {exc}")

    def save() -> float:
        """results.json as it stands, so a run cut short by its time limit still reports."""
        seconds = time.perf_counter() - t0
        clean = {k: {f: v for f, v in r.items() if f != "_st_emb"} for k, r in results.items()}
        report = {"env": env, "args": vars(args), "results": clean, "seconds": seconds}
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)
        return seconds

    # 1. Models and unique files (the end-to-end corpora are hard links to them, sized in step 4)
    spawn = mp.get_context("spawn")
    models, files, unique_of = {}, {}, {}
    with spawn.Pool(cpus) as pool:
        for name in chosen:
            w = all_workloads[name]
            if w.decode_on_device and w.device_decoder == "nvimgcodec":
                from mmembed.media.device_decode import nvimgcodec_installed

                if not nvimgcodec_installed():
                    results[name]["skipped"] = "nvImageCodec is not installed (pack it: benchmarks/pack_nvimgcodec.sh)"
                    stamp(f"{name}: skipped, {results[name]['skipped']}")
                    continue
            if w.model not in models:
                models[w.model] = build_model(args.workdir, w.model, args.smoke, args.dtype, args.device)
            unique_of[name] = max(w.n_pre, w.n_st, w.n_fwd)
            files[name] = corpus(args.workdir, w.corpus, unique_of[name], pool, unique_of[name])
    chosen = [n for n in chosen if "skipped" not in results[n]]
    stamp(f"models and corpora ready: {sorted(models)}")

    # 2. CPU pool preprocess rate, the stage as the job runs it (before Ray starts: the machine to itself)
    keys = sorted({(models[all_workloads[n].model], args.transport_dtype, all_workloads[n].decode_on_device)
                   for n in chosen} | {(models[all_workloads[n].model], sample_transport, False) for n in chosen},
                  key=str)
    samples = {}
    with spawn.Pool(cpus, initializer=init_worker, initargs=(keys,)) as pool:
        for name in chosen:
            w = all_workloads[name]
            key = (models[w.model], args.transport_dtype, w.decode_on_device)
            root = os.path.dirname(files[name][0])
            chunk = max(1, min(32, w.n_pre // (2 * cpus)))
            try:
                pre = pool_preprocess(pool, key, files[name][: w.n_pre], root, chunk)
                results[name]["pre"] = {k: v for k, v in pre.items() if k != "costs"}
                # Padding waste of the whole preprocessed set: ST-style fixed-size chunks in arrival
                # order, against the stage's token-budget batches over windows.
                results[name]["padding"] = padding_report(pre["costs"], w)
                # The forward-only ceiling runs on float pixel rows, whatever the workload ships.
                pixel_key = (models[w.model], sample_transport, False)
                parts = pool.map(
                    preprocess_job,
                    [(pixel_key, files[name][i : i + 4], root, True) for i in range(0, w.n_fwd, 4)],
                    chunksize=1,
                )
                import pyarrow as pa

                samples[name] = pa.concat_tables(parts)
            except Exception as exc:  # noqa: BLE001 - a first run on new hardware: keep the rest
                fail(name, "CPU pool", exc)
                continue
            stamp(f"{name}: CPU pool preprocess {pre['img_s']:.1f} img/s ({pre['ok']} ok, {pre['errors']} errors)")

    # 3. Forward-only ceiling, device decode ceiling and ST encode, in this process (once per model and
    # compile setting: the workloads that share them share the figures)
    from mmembed.models.loading import ModelSpec
    from mmembed.stages.encode import EncodeStage

    shared: dict = {}
    for name in chosen:
        if "error" in results[name]:
            continue
        w = all_workloads[name]
        key = (w.model, w.compile, w.batch_size)
        try:
            if key not in shared:
                spec = ModelSpec(models[w.model], model_kwargs=model_kwargs)
                stage = EncodeStage(spec, device=args.device, batch_size=w.batch_size,
                                    max_batch_tokens=w.max_batch_tokens, compile=args.compile or w.compile)
                forward = forward_only(stage, samples[name], args.device, fwd_seconds)
                del stage
                free_device(args.device)
                stamp(f"{name}: forward-only {forward['img_s']:.1f} img/s")
                st = st_encode(models[w.model], files[name][: w.n_st], w.st_batch_size, args.device, model_kwargs)
                free_device(args.device)
                stamp(f"{name}: ST encode {st['img_s']:.1f} img/s")
                shared[key] = (forward, st)
            forward, st = shared[key]
            results[name]["forward"] = forward
            results[name]["st"] = {"img_s": st["img_s"], "files": w.n_st}
            results[name]["_st_emb"] = st["embeddings"]
            if w.decode_on_device:
                decode = results[name]["decode"] = device_decode_ceiling(
                    models[w.model], files[name][: w.n_pre], w.device_decoder, args.device, w.batch_size,
                    fwd_seconds, model_kwargs, args.hw_shares)
                free_device(args.device)
                stamp(f"{name}: device decode + processor {decode['img_s']:.1f} img/s; by --hw-decode-share "
                      f"{decode.get('hw_share_sweep', '-')}")
        except Exception as exc:  # noqa: BLE001
            fail(name, "forward/ST", exc)
            free_device(args.device)
    save()

    # 4. End to end on Ray, each job sized to stream --stream-seconds, while the budget lasts
    import ray

    started_ray = False
    if not ray.is_initialized():
        init = {"include_dashboard": False, "logging_level": "WARNING"}
        init["runtime_env"] = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
        if args.ray_num_cpus:
            init["num_cpus"] = args.ray_num_cpus
        if args.smoke:
            init.update(num_cpus=args.ray_num_cpus or min(2, cpus), object_store_memory=1_000_000_000)
        ray.init(**init)
        started_ray = True
    try:
        for name in chosen:
            w = all_workloads[name]
            r = results[name]
            if "error" in r:
                continue
            estimate = w.startup_s + args.stream_seconds / 0.9 + 10
            if time.perf_counter() - t0 + estimate > args.budget_s:
                r["skipped"] = (f"budget: {time.perf_counter() - t0:.0f} s spent, about {estimate:.0f} s more needed, "
                                f"--budget-s {args.budget_s:.0f}")
                r.pop("_st_emb", None)
                stamp(f"{name}: skipped, {r['skipped']}")
                continue
            count = e2e_size(w, r, args.stream_seconds, args.smoke)
            # Hard links to the unique files step 1 made: no pool is needed to generate any.
            e2e_files = corpus(args.workdir, w.corpus, count, None, unique_of[name])
            try:
                out = e2e(w, models[w.model], e2e_files, args.workdir,
                          os.path.join(args.workdir, "out", name), args, model_kwargs)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - keep the other workloads' figures
                fail(name, "e2e", exc)
                continue
            root = os.path.dirname(e2e_files[0])
            ids = [os.path.relpath(p, root) for p in e2e_files[: w.n_st]]
            r["parity"] = parity(r.pop("_st_emb"), ids, out.pop("by_id"))
            r["e2e"] = out
            r["summary"] = summarise(r)
            r["config"] = {**asdict(w), "n_e2e": count}
            streamed_enough = args.smoke or out["streamed_s"] >= args.stream_seconds
            passed = (
                out["rc"] == 0
                and out["written"] == count
                and r["parity"]["min_cosine"] is not None
                and r["parity"]["min_cosine"] >= args.min_cosine
            )
            r["passed"] = passed
            r["steady_state"] = streamed_enough
            stamp(f"{name}: e2e {r['summary']['e2e_img_s']:.1f} img/s steady over {out['streamed_s']:.0f} s of shards"
                  f"{'' if streamed_enough else ' (SHORT of --stream-seconds)'}, {out['wall_img_s']:.1f} wall; "
                  f"min cosine {r['parity']['min_cosine']}; GPU {out['gpu']}")  # fmt: skip
            save()
    finally:
        if started_ray:
            ray.shutdown()
    for r in results.values():
        r.pop("_st_emb", None)
    seconds = save()
    text = table(results, env["card"])
    with open(os.path.join(args.out, "table.txt"), "w") as f:
        f.write(text + "\n")
    chart(results, env["card"], os.path.join(args.out, "throughput.png"))
    print(text, flush=True)
    print(f"versions: {json.dumps(env)}")
    print(f"wrote {args.out}/results.json, table.txt, throughput.png in {seconds:.0f}s", flush=True)
    return 0 if all(r.get("passed") or "skipped" in r for r in results.values()) else 1


def padding_report(costs: list, w: Workload) -> dict:
    """Padding waste over the preprocessed set: fixed row chunks in arrival order (no sorting, no
    budget) against the encode stage's own batching over windows of --encode-window rows."""
    from mmembed.models.batching import Budget, plan_batches

    def waste(window: int, plan) -> float:
        real = padded = 0
        for start in range(0, len(costs), window):
            lengths = [c[0] for c in costs[start : start + window]]
            for batch in plan(costs[start : start + window]):
                real += sum(lengths[i] for i in batch)
                padded += len(batch) * max(lengths[i] for i in batch)
        return 1.0 - real / padded if padded else 0.0

    def chunks(part):
        return [list(range(i, min(i + w.batch_size, len(part)))) for i in range(0, len(part), w.batch_size)]

    window = w.encode_window or w.batch_size
    budget = Budget(w.batch_size, w.max_batch_tokens)
    return {
        "unsorted_chunks": waste(w.batch_size, chunks),
        "token_budget": waste(window, lambda part: plan_batches(part, budget)),
        "window": window,
        "max_batch_tokens": w.max_batch_tokens,
    }


if __name__ == "__main__":
    sys.exit(main())
