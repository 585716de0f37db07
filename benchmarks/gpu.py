"""GPU throughput of mmembed against sentence-transformers, measured in one run.

    source .device/activate.sh && python benchmarks/gpu.py --out $OUT/bench     # GPU node
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
  copy     the encode stage's whole call per --copy-mode (staged, pinned, plain).

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


def workloads(smoke: bool, scale: float, cpus: int) -> dict[str, Workload]:
    def n(full: int, tiny: int) -> int:
        return tiny if smoke else max(8, int(full * scale))

    # CLIP B/32 is bound by the CPUs: give preprocessing every core, slightly oversubscribed, and
    # keep the two encoders light (their work is the host side of copies).
    clip_cpu = [
        "--num-preprocessors", str(cpus),
        "--cpus-per-preprocessor", str(round(max(0.1, (cpus - 1.5 - 1.0) / cpus), 3)),
        "--cpus-per-encoder", "0.5",
    ]  # fmt: skip
    two_per_gpu = ["--gpus-per-encoder", "0.5"]
    return {
        "clip_b32": Workload(
            "clip_b32", "clip_b32", "photos", n(40960, 24), n(1024, 8), n(4096, 16), n(512, 8), 512 if not smoke else 8,
            128 if not smoke else 8, extra=two_per_gpu + clip_cpu + ["--preprocess-batch-size", "64" if not smoke else "8"],
        ),
        "clip_l14": Workload(
            "clip_l14", "clip_l14", "photos", n(24576, 16), n(768, 8), n(4096, 16), n(256, 8), 256 if not smoke else 8,
            128 if not smoke else 8, extra=two_per_gpu + ["--preprocess-batch-size", "64" if not smoke else "8"],
        ),
        "clip_b32_gpudecode": Workload(
            "clip_b32_gpudecode", "clip_b32", "photos", n(40960, 24), n(512, 8), n(2048, 16), n(512, 8),
            512 if not smoke else 8, 128 if not smoke else 8, decode_on_device=True,
            extra=two_per_gpu + ["--cpus-per-encoder", "2", "--preprocess-batch-size", "64" if not smoke else "8"],
        ),
        "qwen3vl_shots": Workload(
            "qwen3vl_shots", "qwen3vl", "shots", n(1536, 8), n(96, 4), n(512, 8), n(64, 4), 32 if not smoke else 4,
            32 if not smoke else 4, extra=two_per_gpu + ["--preprocess-batch-size", "8" if not smoke else "4"],
            max_batch_tokens=32 * 384 if not smoke else 4 * 384, encode_window=128 if not smoke else 8,
        ),
        "qwen3vl_mixed": Workload(
            "qwen3vl_mixed", "qwen3vl", "mixed", n(768, 8), n(64, 4), n(256, 8), n(128, 8), 32 if not smoke else 4,
            32 if not smoke else 4, extra=two_per_gpu + ["--preprocess-batch-size", "8" if not smoke else "4"],
            max_batch_tokens=32 * 384 if not smoke else 4 * 384, encode_window=128 if not smoke else 8,
        ),
    }


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
    if args.transport_dtype:
        argv += ["--transport-dtype", args.transport_dtype]
    if w.max_batch_tokens:
        argv += ["--max-batch-tokens", str(w.max_batch_tokens)]
    if w.encode_window:
        argv += ["--encode-window", str(w.encode_window)]
    if w.decode_on_device:
        argv += ["--decode-on-device"]
    if args.compile:
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
    return {
        "rc": rc,
        "argv": argv,
        "written": written,
        "errors": manifest["counts"]["errors"],
        "wall_s": wall,
        "wall_img_s": written / wall,
        "steady_img_s": steady,
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
    ceiling = min(r["forward"]["img_s"], r["pre"]["img_s"])
    return {
        "e2e_img_s": e2e_rate,
        "e2e_over_st": e2e_rate / r["st"]["img_s"],
        "e2e_over_ceiling": e2e_rate / ceiling,
        "node_limit": "GPU" if r["forward"]["img_s"] <= r["pre"]["img_s"] else "CPU",
    }


def table(results: dict, card: str) -> str:
    head = (
        f"{'workload':<15}{'ST':>9}{'forward':>10}{'CPU pre':>10}{'e2e':>9}{'e2e wall':>10}"
        f"{'e2e/ST':>8}{'e2e/min':>9}{'limit':>7}{'min cos':>9}{'pad waste':>10}"
    )
    lines = [f"card: {card}  (img/s; e2e = steady rate from shard times, else rows over the encoders' window, e2e/min = e2e / min(forward, CPU pre))", head, "-" * len(head)]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:<15}FAILED: {r['error']}")
            continue
        s = r["summary"]
        cos = r["parity"]["min_cosine"]
        waste = r.get("padding", {}).get("token_budget")
        lines.append(
            f"{name:<15}{r['st']['img_s']:>9.1f}{r['forward']['img_s']:>10.1f}{r['pre']['img_s']:>10.1f}"
            f"{s['e2e_img_s']:>9.1f}{r['e2e']['wall_img_s']:>10.1f}{s['e2e_over_st']:>8.2f}"
            f"{s['e2e_over_ceiling']:>9.2f}{s['node_limit']:>7}"
            f"{(f'{cos:.5f}' if cos is not None else 'n/a'):>9}{(f'{waste:.1%}' if waste is not None else '-'):>10}"
        )
    return "\n".join(lines)


def chart(results: dict, card: str, path: str) -> None:
    """Grouped bars per workload (each group on its own scale, values printed), drawn with Pillow."""
    from PIL import Image, ImageDraw

    series = [("ST encode", "st", (150, 150, 150)), ("mmembed e2e", "e2e", (30, 110, 200)),
              ("forward-only", "forward", (230, 140, 30)), ("CPU preprocess", "pre", (60, 160, 80))]  # fmt: skip
    ok = {k: v for k, v in results.items() if "error" not in v}
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
        default="clip_b32,clip_l14,clip_b32_gpudecode,qwen3vl_shots,qwen3vl_mixed",
        help="Comma-separated subset of clip_b32, clip_l14, clip_b32_gpudecode (--decode-on-device), "
        "qwen3vl_shots, qwen3vl_mixed.",
    )
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
        default="auto",
        help="mmembed --transport-dtype for pixel tensors (default: the model dtype when it is 16-bit, which "
        "is exact since the model casts its input to that dtype anyway; 'none' for the processor's fp32).",
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
    if args.transport_dtype == "auto":
        args.transport_dtype = args.dtype if args.dtype != "float32" else None
    elif args.transport_dtype == "none":
        args.transport_dtype = None
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

    # 1. Models and corpora
    spawn = mp.get_context("spawn")
    models, files = {}, {}
    with spawn.Pool(cpus) as pool:
        for name in chosen:
            w = all_workloads[name]
            if w.model not in models:
                models[w.model] = build_model(args.workdir, w.model, args.smoke, args.dtype, args.device)
            unique = max(w.n_pre, w.n_st, w.n_fwd)
            files[name] = corpus(args.workdir, w.corpus, max(w.n_e2e, unique), pool, unique)
    stamp(f"models and corpora ready: {sorted(models)}")

    # 2. CPU pool preprocess rate (before Ray starts, so it has the machine to itself)
    keys = sorted({(models[all_workloads[n].model], args.transport_dtype, False) for n in chosen}
                  | {(models[all_workloads[n].model], args.transport_dtype, True) for n in chosen
                     if all_workloads[n].decode_on_device})
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
                # The forward-only ceiling runs on pixel rows (the CPU pool's), whatever the workload.
                pixel_key = (models[w.model], args.transport_dtype, False)
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

    # 3. Forward-only ceiling and ST encode, in this process
    from mmembed.models.loading import ModelSpec
    from mmembed.stages.encode import EncodeStage

    for name in chosen:
        if "error" in results[name]:
            continue
        w = all_workloads[name]
        try:
            spec = ModelSpec(models[w.model], model_kwargs=model_kwargs)
            stage = EncodeStage(
                spec,
                device=args.device,
                batch_size=w.batch_size,
                max_batch_tokens=w.max_batch_tokens,
                compile=args.compile,
            )
            results[name]["forward"] = forward_only(stage, samples[name], args.device, fwd_seconds)
            del stage
            free_device(args.device)
            stamp(f"{name}: forward-only {results[name]['forward']['img_s']:.1f} img/s")
            st = st_encode(models[w.model], files[name][: w.n_st], w.st_batch_size, args.device, model_kwargs)
            results[name]["st"] = {"img_s": st["img_s"], "files": w.n_st}
            results[name]["_st_emb"] = st["embeddings"]
            free_device(args.device)
            stamp(f"{name}: ST encode {st['img_s']:.1f} img/s")
        except Exception as exc:  # noqa: BLE001
            fail(name, "forward/ST", exc)
            free_device(args.device)
    save()

    # 4. End to end on Ray
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
            try:
                out = e2e(w, models[w.model], files[name][: w.n_e2e], args.workdir,
                          os.path.join(args.workdir, "out", name), args, model_kwargs)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - keep the other workloads' figures
                fail(name, "e2e", exc)
                continue
            root = os.path.dirname(files[name][0])
            ids = [os.path.relpath(p, root) for p in files[name][: w.n_st]]
            r["parity"] = parity(r.pop("_st_emb"), ids, out.pop("by_id"))
            r["e2e"] = out
            r["summary"] = summarise(r)
            r["config"] = asdict(w)
            passed = (
                out["rc"] == 0
                and out["written"] == w.n_e2e
                and r["parity"]["min_cosine"] is not None
                and r["parity"]["min_cosine"] >= args.min_cosine
            )
            r["passed"] = passed
            stamp(f"{name}: e2e {r['summary']['e2e_img_s']:.1f} img/s steady, {out['wall_img_s']:.1f} wall; "
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
    return 0 if all(r.get("passed") for r in results.values()) else 1


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
