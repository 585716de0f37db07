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
from mmembed.manifest import MANIFEST_NAME, command_line, library_versions, now_iso, read_json, report, write_json
from mmembed.models import ModelSpec, load_model, model_revision, modality_label, resolve_prompt
from mmembed.options import (
    UsageError,
    add_embedding_options,
    add_io_options,
    add_model_options,
    add_runtime_options,
    job_main,
)
from mmembed.records import InputError, InputSpec, check_unique_ids, discover
from mmembed.runstate import (
    NotCommitted,
    RunLock,
    account,
    begin_attempt,
    clear_output,
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
        "`message` (e.g. a Qwen3-VL embedder).",
    )
    add_runtime_options(p)
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
    dim = meta_model.get_embedding_dimension()
    if args.truncate_dim:
        dim = min(dim, args.truncate_dim)
    out = {
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
    # A rerun into the same output resumes (or finds it complete); another model, prompt or input refuses.
    out["identity"] = run_identity(args, out)
    out["state"] = inspect_output(args.output, out["identity"], args.storage_options, overwrite=args.overwrite)
    return out


# Records one preprocess actor should have to itself before another is worth starting: an actor
# start costs seconds of imports and model load (about 6 s of CPU on a 2-core box), which a few
# thousand images or tens of thousands of texts repay.
RECORDS_PER_PREPROCESSOR = {"media": 2_000, "text": 20_000}


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
            per_actor = RECORDS_PER_PREPROCESSOR[workload(spec)]
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
    }


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------
def compose(args, p: dict, res: dict):
    """read -> preprocess -> encode, as a lazy Ray dataset."""
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
    pre_kwargs = {
        "task": args.task,
        "prompt_name": args.prompt_name,
        "prompt": args.prompt,
        "storage_options": args.storage_options,
        "max_bytes": args.max_bytes,
        "fetch_threads": args.fetch_threads,
        "max_image_pixels": args.max_image_pixels,
        "allow_http": args.allow_http,
        "transport_dtype": args.transport_dtype,
    }
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
        EncodeStage,
        fn_constructor_args=(p["model_spec"],),
        fn_constructor_kwargs={
            "device": res["device"],
            "batch_size": args.batch_size,
            "task": args.task,
            "normalize": args.normalize,
            "truncate_dim": args.truncate_dim,
            "precision": args.precision,
            "max_batch_tokens": args.max_batch_tokens,
            "max_batch_patches": args.max_batch_patches,
            "compile": args.compile,
        },
        batch_size=args.encode_window or args.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=res["num_encoders"]),
        max_restarts=-1,
        max_task_retries=-1,
        **enc_remote,
    )
    return ds


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
    import ray
    from ray.data import DataContext

    from mmembed.stages.write import ShardWriter

    where = init_ray(args.address)
    cluster = ray.cluster_resources()
    res = plan_resources(cluster.get("CPU", 1), cluster.get("GPU", 0), args, p["input"])
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.enable_operator_progress_bars = True

    if args.overwrite:
        clear_output(args.output, args.storage_options)
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
        from mmembed.changes import IndexRef

        index, count = ray.remote(committed_index).options(num_cpus=0.25, num_returns=2).remote(
            paths, error_paths, args.storage_options
        )
        already = ray.get(count)
        p = {**p, "skip_filter": NotCommitted(IndexRef(index))}
        log.info("resuming: %d record(s) already committed in %d shard(s) are skipped",
                 already, len(paths) + len(error_paths))

    ds = compose(args, p, res)
    sink = ShardWriter(
        args.output,
        result_columns=["id", "embedding", "modality"],
        storage_options=args.storage_options,
        shard_rows=args.shard_rows,
        run_token=token,
    )
    ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.25})
    # Every committed shard counts, this attempt's and earlier ones'.
    paths, error_paths = committed_shards(args.output, args.storage_options)
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
    sys.exit(main())
