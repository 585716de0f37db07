"""Ray job entry point: embed a corpus.

    python -m pipelines.embed --input PATH_OR_URI --output URI --model NAME_OR_PATH [options]

`mmembed embed` runs this same code. It checks everything it can before Ray starts, then
composes read -> preprocess (CPU pool) -> encode (GPU pool) -> write, streaming.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import uuid

from mmembed import __version__
from mmembed.device_use import summarise as summarise_device_use
from mmembed.manifest import MANIFEST_NAME, command_line, library_versions, now_iso, read_json, report, write_json
from mmembed.models import ModelPathError, ModelSpec, load_model, model_revision, modality_label, resolve_prompt
from mmembed.options import (
    UsageError,
    add_embedding_options,
    add_io_options,
    add_model_options,
    add_runtime_options,
    fetch_kwargs,
    job_main,
)
from mmembed.outputs import check_output, clear_owned
from mmembed.records import InputError, InputSpec, check_unique_ids, discover
from mmembed.runstate import (
    RUN_NAME,
    NotCommitted,
    RunLock,
    account,
    begin_attempt,
    committed_index,
    committed_shards,
    drop_error_shards,
    finish_attempt,
    inspect_output,
    run_identity,
)
from mmembed.storage import join_uri

log = logging.getLogger("mmembed")

EXIT_OK, EXIT_ERRORS, EXIT_FAILED = 0, 3, 1


def build_parser(prog: str = "mmembed embed") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Embed a corpus of texts, images, audio, video or multimodal records with a "
        "sentence-transformers model, on Ray. Results equal SentenceTransformer.encode on the same inputs.",
        epilog="Input: a Parquet manifest (file, directory or glob) with a string `id` column and one or more of "
        "text, image, audio, video (media cells are URIs/paths or raw bytes; audio may also be an "
        "{array, sampling_rate} struct), or a `messages` column of chat-message lists ({role, content}, content "
        "a string or a list of {type, text|image|audio|video} parts), or a directory/glob of media files "
        "(id = path relative to the root, modality from the extension). Output: part-*.parquet "
        "(id, embedding, modality), _errors/*.parquet (id, stage, error) and _manifest.json. "
        "Exit codes: 0 ok, 2 bad usage (nothing ran), 3 more errors than --max-error-fraction, 1 job failed.",
    )
    p.add_argument("--input", required=True, help="Manifest or media directory/glob: local path or fsspec URI.")
    p.add_argument("--output", required=True, help="Output directory: local path or fsspec URI (e.g. s3://b/p).")
    add_model_options(p)
    g = add_embedding_options(p)
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="Discard whatever --output holds (a finished run, or an unfinished one of another model, prompt "
        "or input) and start afresh. Without it, rerunning the same command resumes an interrupted run "
        "(committed shards are kept, only the rest is embedded) or does nothing if it finished.",
    )
    g.add_argument(
        "--retry-errors",
        action="store_true",
        help="Embed again the records that earlier attempts at this output wrote as error rows (a fetch "
        "that timed out, a file uploaded since), finished run or not; their old error rows are dropped "
        "first, and whatever fails again becomes a new error row. Without it, a rerun keeps error rows "
        "as they are.",
    )
    g.add_argument(
        "--lease-seconds",
        type=float,
        default=60.0,
        help="Lease on --output (`_lock.json`) that keeps a second run from writing into it; the running job "
        "renews it every quarter of this. A lease of a crashed run on another host is taken over once it "
        "is this old; on the same host, as soon as its process is gone (default: 60).",
    )
    g.add_argument(
        "--split-modalities",
        action="store_true",
        help="Embed each modality of a record on its own, as CLIP-style models need: a record with text "
        "and an image gives two rows. Every output id becomes `<id>#<modality>` (modality: text, image, "
        "audio, video or message; the source id is everything before the last `#`). Without it, a "
        "record with several modality cells is one multimodal input, which needs a model that supports "
        "`message` (e.g. a Qwen3-VL embedder). Such records in the first 1,000 rows of a manifest fail the job "
        "before Ray starts; later ones become error rows that say so.",
    )
    add_runtime_options(p)
    compute = next(g for g in p._action_groups if g.title == "compute")
    compute.add_argument(
        "--executor",
        choices=["auto", "ray", "local"],
        default="auto",
        help="Where the stages run. ray: a Ray Data pipeline with CPU and GPU actor pools (on --address, "
        "or an in-process Ray). local: in this process, without Ray: for small inputs, which a Ray job "
        "would spend most of its time starting (Ray itself, then one process per actor importing torch "
        "and sentence-transformers). auto (default): local when no cluster is given (no --address, no "
        "$RAY_ADDRESS, Ray not already started in this process), no pool size is set, and the input is "
        f"no bigger than one preprocess actor's share ({RECORDS_PER_PREPROCESSOR['media']:,} media or "
        f"{RECORDS_PER_PREPROCESSOR['text']:,} text records); ray otherwise. Outputs are the same either way.",
    )
    compute.add_argument(
        "--decode-on-device",
        action="store_true",
        help="JPEG photos are decoded (nvJPEG) and preprocessed by the encoders on their GPU, with the model's "
        "own image processor; the CPU pool only fetches their bytes and reads their headers. For CLIP-style "
        "models, whose rate on a GPU node is otherwise the CPU pool's decode rate. PNG, WebP, grey, CMYK, "
        "progressive and EXIF-rotated images are still decoded by the CPU pool, record by record. Embeddings "
        "match ST's within JPEG decoder rounding (cosine >= 0.999). Refused for models whose image features "
        "are not CLIP-style pixel_values. On a CPU encoder the same code runs on the CPU.",
    )
    add_io_options(p)
    return p


# --------------------------------------------------------------------------------------------
# Before Ray starts
# --------------------------------------------------------------------------------------------
def plan(args) -> dict:
    """Every check that needs no cluster: input, model, modalities, output. Raises UsageError."""
    try:
        spec = discover(args.input, args.storage_options)
        check_unique_ids(spec, args.storage_options)
    except InputError as exc:
        raise UsageError(str(exc)) from None
    model_spec = ModelSpec(
        args.model,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        model_kwargs=args.model_kwargs,
        processor_kwargs=args.processor_kwargs,
    )
    try:
        meta_model = load_model(model_spec, weights=False)
    except ModelPathError as exc:
        raise UsageError(f"{exc}. Give the directory of a saved sentence-transformers model, or a hub id.") from None
    except Exception as exc:  # noqa: BLE001 - any load failure is a usage problem here
        raise UsageError(
            f"cannot load model {args.model!r}: {type(exc).__name__}: {exc}. Check the name or path, "
            "--revision, --trust-remote-code, and HF_HUB_OFFLINE (offline runs need the model in the local cache)."
        ) from None
    unsupported = sorted(m for m in spec.modalities if not meta_model.supports(m))
    if unsupported and args.on_unsupported == "fail":
        raise UsageError(
            f"the input has {', '.join(unsupported)} records but model {args.model} supports only "
            f"{', '.join(modality_label(m) for m in meta_model.modalities)}. Use a model that supports "
            f"{', '.join(unsupported)} (e.g. a CLIP or Qwen3-VL embedder for images), filter those records out, "
            "or pass --on-unsupported error-row to write them as error rows and embed the rest."
        )
    if not args.split_modalities and args.on_unsupported == "fail":
        from mmembed.stages.read import sample_record_modalities

        combined = sorted(
            label
            for label in sample_record_modalities(spec, args.storage_options)
            if "+" in label and not meta_model.supports(tuple(label.split("+")))
        )
        if combined:
            raise UsageError(
                f"the input has records combining {', '.join(combined)} (several modality cells in one row), "
                f"but model {args.model} cannot embed modalities together: it does not support `message` "
                "inputs. Pass --split-modalities to embed each modality separately (one row per id and "
                "modality, ids `<id>#<modality>`), use a model that supports messages (e.g. a Qwen3-VL "
                "embedder), or pass --on-unsupported error-row to write such records as error rows."
            )
    try:
        prompt = resolve_prompt(meta_model, args.task, args.prompt_name, args.prompt)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if getattr(args, "decode_on_device", False):
        from mmembed.device_decode import unsupported_reason

        why = unsupported_reason(meta_model)
        if why:
            raise UsageError(f"--decode-on-device cannot serve model {args.model}: {why}. Drop the option; the "
                             "CPU pool then decodes every image.")
    dim = meta_model.get_embedding_dimension()
    if args.truncate_dim:
        dim = min(dim, args.truncate_dim)
    quantization = quantization_plan(args, dim)
    out = {
        "quantization": quantization,
        "input": spec,
        "model_spec": model_spec,
        "revision": model_revision(model_spec),
        "prompt": prompt,
        "dim": dim,
        "modalities": list(meta_model.modalities),
        "similarity_fn_name": getattr(meta_model, "similarity_fn_name", None),
        "has_normalize_module": any(type(m).__name__ == "Normalize" for m in meta_model),
        "unsupported": unsupported,
    }
    if quantization and quantization["ranges"] is None and not args.overwrite:
        # A resumed run quantises with the ranges its first attempt calibrated, never fresh ones.
        recorded = ((read_json(join_uri(args.output, RUN_NAME), args.storage_options) or {}).get("identity") or {})
        before = recorded.get("quantization") or {}
        if {k: v for k, v in before.items() if k != "ranges"} == {k: v for k, v in quantization.items() if k != "ranges"}:
            quantization["ranges"] = before.get("ranges")
    out["executor"] = choose_executor(args, spec)
    if quantization and quantization["calibration"] and quantization["ranges"] is None and getattr(args, "executor", "ray") == "auto":
        out["executor"] = "ray"  # calibration is a pass of the Ray pipeline of its own
    # A rerun into the same output resumes (or finds it complete); another model, prompt or input refuses.
    out["identity"] = run_identity(args, out)
    out["state"] = inspect_output(args.output, out["identity"], args.storage_options, overwrite=args.overwrite)
    return out


def quantization_plan(args, dim: int) -> dict | None:
    """What a quantised --precision stores (None for float precisions); int8/uint8 ranges when known up front."""
    from mmembed.stages.encode import FLOAT_COLUMN, QUANTIZED, stored_dim

    if args.precision not in QUANTIZED:
        if args.keep_float or args.calibration_embeddings:
            raise UsageError(
                "--keep-float and --calibration-embeddings apply to a quantised --precision "
                "(int8, uint8, binary, ubinary); drop them or choose one."
            )
        return None
    binary = args.precision in ("binary", "ubinary")
    if binary and dim % 8:
        raise UsageError(
            f"--precision {args.precision} packs 8 dimensions per byte, but the embeddings have {dim} dimensions; "
            "choose a --truncate-dim that is a multiple of 8, or --precision int8/uint8."
        )
    calibration = None
    ranges = None
    if not binary:
        if args.calibration_embeddings:
            calibration = {"embeddings": args.calibration_embeddings}
            ranges = ranges_from_output(args.calibration_embeddings, args, dim)
        else:
            calibration = {"records": args.calibration_records}
    return {
        "precision": args.precision,
        "stored_dim": stored_dim(dim, args.precision),
        "packed_bits": binary,
        "calibration": calibration,
        "float_column": FLOAT_COLUMN if args.keep_float else None,
        "ranges": ranges,
    }


def ranges_from_output(uri: str, args, dim: int) -> list:
    """int8/uint8 ranges ([2][dim]: per-dimension min, max) over the float vectors of a finished embed output."""
    import pyarrow.parquet as pq

    from mmembed.stages.encode import update_ranges
    from mmembed.stages.search import embedding_matrix
    from mmembed.storage import filesystem

    m = read_json(join_uri(uri, MANIFEST_NAME), args.storage_options)
    model = (m or {}).get("model", {})
    if not m or m.get("job") != "embed" or m.get("status") != "complete":
        raise UsageError(f"--calibration-embeddings {uri} is not a finished `mmembed embed` output.")
    if model.get("precision") not in ("float32", "float16") or model.get("dim") != dim or model.get("name") != args.model:
        raise UsageError(
            f"--calibration-embeddings {uri} holds {model.get('precision')} vectors of dim {model.get('dim')} from "
            f"{model.get('name')}; calibration needs float vectors of dim {dim} from {args.model}."
        )
    ranges = None
    for f in m.get("files", []):
        fs, path = filesystem(join_uri(uri, f["name"]), args.storage_options)
        with fs.open(path, "rb") as fh:
            for batch in pq.ParquetFile(fh).iter_batches(columns=["embedding"]):
                ranges = update_ranges(ranges, embedding_matrix(batch.column(0), dim))
    if ranges is None:
        raise UsageError(f"--calibration-embeddings {uri} holds no vectors.")
    return ranges.tolist()


def calibrate(args, p: dict, res: dict) -> list:
    """int8/uint8 ranges from the first --calibration-records records, embedded by the same pipeline in float32.

    The ranges hold for the whole corpus: per-batch ranges would make vectors of different
    batches incomparable. Only a running min/max reaches the driver, never the vectors.
    """
    import pyarrow.compute as pc

    from mmembed.stages.encode import update_ranges
    from mmembed.stages.search import embedding_matrix

    n = args.calibration_records
    ds = compose(args, {**p, "skip_filter": None, "limit": n}, res,
                 encode={"precision": "float32", "ranges": None, "keep_float": False})
    ranges, count = None, 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        ok = batch.filter(pc.is_null(batch.column("error")))
        if ok.num_rows:
            ranges = update_ranges(ranges, embedding_matrix(ok.column("embedding"), p["dim"]))
            count += ok.num_rows
    if count < 2:
        raise UsageError(
            f"int8/uint8 calibration embedded {count} of the first {n} records (the rest are error rows); ranges "
            "need at least 2. Raise --calibration-records or pass --calibration-embeddings."
        )
    log.info("calibrated %s ranges on %d embeddings", args.precision, count)
    return ranges.tolist()


# Records one preprocess actor should have to itself before another is worth starting: an actor
# start costs seconds of imports and model load (about 6 s of CPU on a 2-core box), which a few
# thousand images or tens of thousands of texts repay.
RECORDS_PER_PREPROCESSOR = {"media": 2_000, "text": 20_000}


def choose_executor(args, spec) -> str:
    """"ray" or "local" for --executor (see its help); refuses a local run on a cluster."""
    import os

    wanted = getattr(args, "executor", "ray")
    on_cluster = bool(args.address or os.environ.get("RAY_ADDRESS"))
    if wanted == "local":
        if on_cluster:
            raise UsageError("--executor local runs in this process, without Ray, but a cluster address is set "
                             "(--address or $RAY_ADDRESS); drop one of them.")
        return "local"
    if wanted == "ray":
        return "ray"
    ray = sys.modules.get("ray")
    if on_cluster or (ray is not None and ray.is_initialized()):
        return "ray"
    if args.num_preprocessors or args.num_encoders or getattr(args, "encoder_stage", None):
        return "ray"
    return "local" if spec.num_records <= RECORDS_PER_PREPROCESSOR[workload(spec)] else "ray"


def workload(spec) -> str:
    """"media" when any record needs fetching and decoding beyond text, else "text"."""
    return "media" if set(spec.modalities) - {"text"} else "text"


def plan_resources(cpus: float, gpus: float, args, spec=None) -> dict:
    """Actor counts and per-actor resources for the cluster Ray reports.

    One CPU stays unclaimed by the actor pools: Ray Data's file listing takes a whole CPU and
    read/write tasks need a slice, and actors that hold every CPU would starve them forever.
    With the input's InputSpec, a default-sized preprocess pool is no bigger than the input needs.
    """
    device = args.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda" and gpus <= 0:
        raise UsageError("--device cuda was asked for but the Ray cluster has no GPUs; use --device cpu or auto.")
    if device == "cuda":
        encoders = args.num_encoders or max(1, int(gpus / args.gpus_per_encoder))
        enc_cpus = args.cpus_per_encoder if args.cpus_per_encoder is not None else 1.0
    else:
        encoders = args.num_encoders or 1
        enc_cpus = args.cpus_per_encoder if args.cpus_per_encoder is not None else (1.0 if cpus >= 4 else 0.5)
    free = cpus - 1.0 - encoders * enc_cpus
    pre_cpus = args.cpus_per_preprocessor
    if args.num_preprocessors:
        preprocessors = args.num_preprocessors
    else:
        preprocessors = max(1, int(free // (pre_cpus or 1.0)))
        if device == "cpu" and pre_cpus is None:
            # Even on 2 CPUs two decoders outrun one (tiny CLIP, 2 cores: 300-400 vs 250 img/s): a
            # small model's encoder idles most of the time, and a large model's encoder is the
            # bottleneck whatever feeds it. The price is one more actor start (~6 s of imports).
            preprocessors = max(preprocessors, min(2, int(cpus)))
        if spec is not None and spec.num_records:
            # On a GPU node the preprocess actors start while the encoders load their weights, so
            # another actor costs no wall time: only a preprocess batch apiece bounds the pool. The
            # 2,000-records rule starved an H200 (1,536 screenshots got one actor: 0.26 of forward).
            per_actor = args.preprocess_batch_size if device == "cuda" else RECORDS_PER_PREPROCESSOR[workload(spec)]
            preprocessors = min(preprocessors, -(-spec.num_records // per_actor))
    if pre_cpus is None:
        # Fit the pool into what is left; decode is single-threaded, so a fraction still works.
        pre_cpus = 1.0 if preprocessors * 1.0 <= free else max(0.1, round(free / preprocessors, 3))
    if preprocessors * pre_cpus + encoders * enc_cpus > cpus - 0.5 + 1e-9:
        raise UsageError(
            f"{preprocessors} preprocess actors x {pre_cpus} CPU + {encoders} encoder actors x {enc_cpus} CPU "
            f"do not fit the cluster's {cpus:g} CPUs with room for read and write tasks; lower "
            "--num-preprocessors / --cpus-per-preprocessor / --cpus-per-encoder."
        )
    return {
        "device": device,
        "num_encoders": encoders,
        "cpus_per_encoder": enc_cpus,
        "gpus_per_encoder": args.gpus_per_encoder if device == "cuda" else 0,
        "num_preprocessors": preprocessors,
        "cpus_per_preprocessor": pre_cpus,
        "calls_per_encoder": getattr(args, "calls_per_encoder", None) or (2 if device == "cuda" else 1),
    }


def encoder_pool(res: dict):
    """The encoder actor pool. With several calls per actor, Ray runs them on the actor's threads:
    each call syncs with the device once, at its end, and meanwhile another call collates and
    queues its batch, so the device never idles on the host's per-batch work."""
    from ray.data import ActorPoolStrategy

    calls = res.get("calls_per_encoder", 1)
    if calls == 1:
        return ActorPoolStrategy(size=res["num_encoders"])
    return ActorPoolStrategy(
        size=res["num_encoders"],
        max_concurrent_calls_per_actor=calls,
        enable_true_multi_threading=True,
        # Each thread needs a block of its own waiting for it.
        max_tasks_in_flight_per_actor=calls + 1,
    )


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------
def preprocess_kwargs(args) -> dict:
    return {
        "task": args.task,
        "prompt_name": args.prompt_name,
        "prompt": args.prompt,
        "decode_on_device": getattr(args, "decode_on_device", False),
        **fetch_kwargs(args),
    }


def encoder_kwargs(args) -> dict:
    return {
        "batch_size": args.batch_size,
        "task": args.task,
        "normalize": args.normalize,
        "truncate_dim": args.truncate_dim,
        "max_batch_tokens": args.max_batch_tokens,
        "max_batch_patches": args.max_batch_patches,
        "compile": args.compile,
        "copy_mode": getattr(args, "copy_mode", "staged"),
        "decode_on_device": getattr(args, "decode_on_device", False),
    }


def encode_precision(args, p: dict) -> dict:
    """The encoder's storage precision: --precision and, when quantising, the corpus's ranges."""
    q = p.get("quantization") or {}
    return {"precision": args.precision, "ranges": q.get("ranges"), "keep_float": bool(q.get("float_column"))}


def compose(args, p: dict, res: dict, encode: dict | None = None):
    """read -> preprocess -> encode, as a lazy Ray dataset; `encode` overrides the stored precision.

    `args.encoder_stage` (not a command-line option) swaps the encoder class, with
    `args.encoder_stage_kwargs` added to its arguments: benchmarks/feed.py puts the stand-ins of
    mmembed/testing/standin.py in the real pipeline this way.
    """
    from ray.data import ActorPoolStrategy

    from mmembed.stages.encode import EncodeStage
    from mmembed.stages.preprocess import PreprocessStage
    from mmembed.stages.read import ReadStage

    rows = block_rows(p["input"], res["num_preprocessors"], args.preprocess_batch_size)
    if p.get("records") is not None:  # records a caller prepared (reembed's diff), not the input itself
        ds = p["records"].repartition(target_num_rows_per_block=rows)
    else:
        ds = ReadStage(p["input"], args.storage_options, block_rows=rows).dataset()
    if args.split_modalities:
        from mmembed.stages.read import split_modalities

        ds = ds.map_batches(split_modalities, batch_format="pyarrow", batch_size=None, num_cpus=0.25)
    if p.get("skip_filter") is not None:
        ds = ds.filter(p["skip_filter"])
    if p.get("limit"):
        ds = ds.limit(p["limit"])
    encode = {**encode_precision(args, p), **(encode or {})}
    pre_kwargs = preprocess_kwargs(args)
    if p.get("passthrough"):  # record columns the caller needs back on each result row (reembed's content_hash)
        pre_kwargs["passthrough"] = encode["passthrough"] = tuple(p["passthrough"])
    pre_remote = {"num_cpus": res["cpus_per_preprocessor"]}
    if args.memory_per_preprocessor:
        pre_remote["memory"] = args.memory_per_preprocessor
    if args.preprocessor_resources:
        pre_remote["resources"] = args.preprocessor_resources
    ds = ds.map_batches(
        PreprocessStage,
        fn_constructor_args=(p["model_spec"],),
        fn_constructor_kwargs=pre_kwargs,
        batch_size=args.preprocess_batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=res["num_preprocessors"]),
        **pre_remote,
    )
    enc_remote = {"num_cpus": res["cpus_per_encoder"]}
    if res["device"] == "cuda":
        enc_remote["num_gpus"] = res["gpus_per_encoder"]
    if args.encoder_resources:
        enc_remote["resources"] = args.encoder_resources
    ds = ds.map_batches(
        getattr(args, "encoder_stage", None) or EncodeStage,
        fn_constructor_args=(p["model_spec"],),
        fn_constructor_kwargs={
            **getattr(args, "encoder_stage_kwargs", {}),
            "device": res["device"],
            **encoder_kwargs(args),
            **encode,
        },
        batch_size=args.encode_window or args.batch_size,
        batch_format="pyarrow",
        compute=encoder_pool(res),
        max_restarts=-1,
        max_task_retries=-1,
        **enc_remote,
    )
    return ds


def local_resources(args) -> dict:
    from mmembed.models import resolve_device

    return {
        "device": resolve_device(args.device),
        "num_encoders": 1,
        "cpus_per_encoder": None,
        "gpus_per_encoder": 0,
        "num_preprocessors": 1,
        "cpus_per_preprocessor": None,
        "executor": "local",
    }


def run_local(args, p: dict, res: dict, sink) -> None:
    """compose()'s stages in this process (mmembed/local.py): the --executor local path."""
    import pyarrow as pa

    from mmembed.local import LocalExecutor
    from mmembed.stages.encode import EncodeStage
    from mmembed.stages.preprocess import PreprocessStage
    from mmembed.stages.read import ReadStage, split_modalities

    cpu_stages = []
    if args.split_modalities:
        cpu_stages.append(split_modalities)
    index = p.get("skip_index")
    if index is not None:
        cpu_stages.append(lambda t: t.filter(pa.array(~index.lookup(t.column("id"))[0])))
    cpu_stages.append(PreprocessStage(p["model_spec"], **preprocess_kwargs(args)))
    encoder = EncodeStage(p["model_spec"], device=res["device"], **encoder_kwargs(args), **encode_precision(args, p))
    # Blocks of a few encoder batches: the producer preprocesses the next while this one encodes.
    rows = max(args.preprocess_batch_size, args.encode_window or 4 * args.batch_size)
    blocks = ReadStage(p["input"], args.storage_options, block_rows=rows).tables()
    LocalExecutor(cpu_stages, encoder).write(blocks, sink)


# Media records cost milliseconds each to decode and preprocess, text records microseconds:
# media blocks stay small enough that the last ones do not leave the pool waiting on a straggler.
MAX_BLOCK_ROWS = {"media": 256, "text": 2_000}


def block_rows(spec, preprocessors: int, batch_size: int) -> int:
    """Rows per block entering the preprocess pool: about four blocks per actor, within bounds."""
    cap = MAX_BLOCK_ROWS[workload(spec)]
    want = -(-max(spec.num_records, 1) // (4 * max(preprocessors, 1)))
    return max(batch_size, min(cap, want))


def init_ray(address: str | None):
    import os

    import ray

    if ray.is_initialized():
        return "existing"
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return address
    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    return "embedded"


def run(args) -> int:
    started = time.time()
    started_iso = now_iso()
    check_output("embed", args.output, args.storage_options, overwrite=args.overwrite,
                 inputs={"--input": args.input, "--calibration-embeddings": getattr(args, "calibration_embeddings", None)})
    p = plan(args)
    if p["state"] == "complete":
        existing = read_json(join_uri(args.output, MANIFEST_NAME), args.storage_options)
        errors = existing.get("counts", {}).get("errors", 0)
        if not (args.retry_errors and errors):
            print(report("mmembed embed", existing, args.output), flush=True)
            hint = f"; --retry-errors embeds its {errors:,} error row(s) again" if errors else ""
            print(f"mmembed embed: {args.output} already holds this run, complete; nothing to do "
                  f"(--overwrite recomputes it{hint}).", flush=True)
            return EXIT_OK
    lock = RunLock(args.output, args.storage_options, ttl_s=args.lease_seconds).acquire()
    try:
        return execute(args, p, started, started_iso)
    finally:
        lock.release()


def execute(args, p: dict, started: float, started_iso: str) -> int:
    """The job proper, run while this process holds the output's lease."""
    local = p["executor"] == "local"
    if local:
        where = "local"
        res = local_resources(args)
    else:
        import ray
        from ray.data import DataContext

        where = init_ray(args.address)
        cluster = ray.cluster_resources()
        res = {**plan_resources(cluster.get("CPU", 1), cluster.get("GPU", 0), args, p["input"]), "executor": "ray"}
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = True
        ctx.enable_operator_progress_bars = True

    q = p.get("quantization")
    if q and q["calibration"] and q["ranges"] is None:
        q["ranges"] = calibrate(args, p, res)
        p["identity"]["quantization"] = q
    if args.overwrite:
        clear_owned("embed", args.output, args.storage_options)
    token = uuid.uuid4().hex[:8]
    run_state = begin_attempt(args.output, p["identity"], args.storage_options, token, p["state"] != "new")
    retried = 0
    if args.retry_errors and p["state"] != "new":
        retried = drop_error_shards(args.output, args.storage_options)
        if retried:
            log.info("--retry-errors: %d error row(s) of earlier attempts are embedded again", retried)
    paths, error_paths = committed_shards(args.output, args.storage_options)
    already = 0
    if paths or error_paths:
        if local:
            index, already = committed_index(paths, error_paths, args.storage_options)
            p = {**p, "skip_index": index}
        else:
            from mmembed.changes import IndexRef

            index, count = ray.remote(committed_index).options(num_cpus=0.25, num_returns=2).remote(
                paths, error_paths, args.storage_options
            )
            already = ray.get(count)
            p = {**p, "skip_filter": NotCommitted(IndexRef(index))}
        log.info("resuming: %d record(s) already committed in %d shard(s) are skipped",
                 already, len(paths) + len(error_paths))

    if local:
        from mmembed.stages.write import ShardWriter
    else:
        from mmembed.stages.write_ray import RayShardWriter as ShardWriter
    sink = ShardWriter(
        args.output,
        result_columns=["id", "embedding", "modality"] + ([q["float_column"]] if q and q["float_column"] else []),
        storage_options=args.storage_options,
        shard_rows=args.shard_rows,
        run_token=token,
    )
    if local:
        run_local(args, p, res, sink)
    else:
        compose(args, p, res).write_datasink(sink, ray_remote_args={"num_cpus": 0.25})
    # Every committed shard counts, this attempt's and earlier ones'.
    paths, error_paths = committed_shards(args.output, args.storage_options)
    if local:
        totals = account(paths, error_paths, args.storage_options)
    else:
        totals = ray.get(
            ray.remote(account).options(num_cpus=0.25).remote(paths, error_paths, args.storage_options)
        )
    finished = time.time()
    spec: InputSpec = p["input"]
    records = spec.num_records
    unaccounted = records - totals["written"] - totals["errors"]
    if args.split_modalities:
        # A record yields one row per modality, so rows no longer count records one to one.
        unaccounted = None
    manifest = {
        "status": "complete",
        "job": "embed",
        "mmembed_version": __version__,
        "model": {
            "name": args.model,
            "revision": p["revision"],
            "dim": p["dim"],
            "normalize": bool(args.normalize or p["has_normalize_module"]),
            "normalize_flag": args.normalize,
            "similarity_fn_name": p["similarity_fn_name"],
            "task": args.task,
            "prompt_name": args.prompt_name,
            "prompt": p["prompt"],
            "precision": args.precision,
            "quantization": q,
            "truncate_dim": args.truncate_dim,
            "model_kwargs": args.model_kwargs,
            "processor_kwargs": args.processor_kwargs,
            "modalities": [modality_label(m) for m in p["modalities"]],
        },
        "input": {"uri": args.input, "kind": spec.kind, "fingerprint": spec.fingerprint, "records": records},
        "output": {"uri": args.output, "shard_rows": args.shard_rows},
        "counts": {
            "records": records,
            "written": totals["written"],
            "errors": totals["errors"],
            "unaccounted": unaccounted,
            "by_modality": totals["modalities"],
            "duplicate_ids": totals["duplicate_ids"],
            "resumed_from_committed": already,
            "retried_errors": retried,
        },
        "attempts": run_state["attempts"],
        "files": totals["files"],
        "error_files": totals["error_files"],
        "resources": {**res, "ray": where},
        # This attempt's encoders only: time in forward over wall, utilisation, memory.
        "device_use": summarise_device_use((sink.result or {}).get("encoders", {})),
        "versions": library_versions(),
        "started_at": started_iso,
        "finished_at": now_iso(),
        "duration_s": round(finished - started, 3),
        "command_line": command_line(),
    }
    write_json(join_uri(args.output, MANIFEST_NAME), manifest, args.storage_options)
    finish_attempt(args.output, run_state, args.storage_options)
    print(report("mmembed embed", manifest, args.output), flush=True)
    if totals["errors"]:
        print(f"  retry    once their cause is fixed (see _errors), rerun this command with --retry-errors to "
              f"embed the {totals['errors']:,} error record(s) again", flush=True)
    if totals["errors"] and not totals["written"]:
        print(f"mmembed embed: every record failed ({totals['errors']:,} error rows, no embeddings); see "
              f"{args.output.rstrip('/')}/_errors", file=sys.stderr)
        return EXIT_ERRORS
    if unaccounted is None:
        failed_fraction = totals["errors"] / max(totals["written"] + totals["errors"], 1)
    else:
        failed_fraction = (totals["errors"] + max(unaccounted, 0)) / max(records, 1)
    if failed_fraction > args.max_error_fraction:
        print(
            f"mmembed embed: {failed_fraction:.1%} of records failed, above --max-error-fraction "
            f"{args.max_error_fraction:.1%}; see {args.output.rstrip('/')}/_errors",
            file=sys.stderr,
        )
        return EXIT_ERRORS
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return job_main("embed", build_parser(), run, argv)


if __name__ == "__main__":
    from mmembed.options import exit_process

    exit_process(main())
