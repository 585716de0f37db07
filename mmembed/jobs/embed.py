"""The embed job: a corpus in, one embedding row (or error row) per record out.

    inputs/discover.py -> stages/read.py -> stages/preprocess.py (CPU pool)
        -> stages/encode.py (device pool) -> stages/write.py (shards, _errors/)

`plan` checks everything it can before Ray starts; `stages` is the job's stage list, which the
runner (mmembed/jobs/runner.py) applies on Ray or in this process.
"""

from __future__ import annotations

import logging
import uuid

from mmembed.errors import UsageError
from mmembed.executors.pipeline import CPU, DEVICE, Limit, Stage
from mmembed.inputs.discover import InputError, check_unique_ids, discover
from mmembed.jobs.config import EmbedConfig, fetch_kwargs
from mmembed.jobs.runner import EXIT_OK, Job, Outcome
from mmembed.models.loading import (
    MULTI_VECTOR,
    ModelPathError,
    load_model,
    modality_label,
    model_family,
    model_revision,
    resolve_prompt,
)
from mmembed.outputs.manifest import MANIFEST_NAME, read_json, report
from mmembed.storage.fs import join_uri

log = logging.getLogger("mmembed")


# --------------------------------------------------------------------------------------------
# Before Ray starts
# --------------------------------------------------------------------------------------------
def plan(cfg: EmbedConfig, *, standin: bool = False) -> dict:
    """Every check that needs no cluster: input, model, modalities, output. Raises UsageError."""
    from mmembed.executors.cluster import choose_executor
    from mmembed.outputs.runstate import RUN_NAME, inspect_output, run_identity

    try:
        spec = discover(cfg.input, cfg.storage_options, cfg.columns())
        check_unique_ids(spec, cfg.storage_options)
    except InputError as exc:
        raise UsageError(str(exc)) from None
    model_spec = cfg.model_spec()
    try:
        multi = model_family(model_spec) == MULTI_VECTOR
        if multi:
            model_spec = cfg.model_spec("multivector")
        meta_model = load_model(model_spec, weights=False)
    except ModelPathError as exc:
        raise UsageError(f"{exc}. Give the directory of a saved sentence-transformers model, or a hub id.") from None
    except Exception as exc:  # noqa: BLE001 - any load failure is a usage problem here
        raise UsageError(
            f"cannot load model {cfg.model!r}: {type(exc).__name__}: {exc}. Check the name or path, "
            "--revision, --trust-remote-code, and HF_HUB_OFFLINE (offline runs need the model in the local cache)."
        ) from None
    unsupported = sorted(m for m in spec.modalities if not meta_model.supports(m))
    if unsupported and cfg.on_unsupported == "fail":
        raise UsageError(
            f"the input has {', '.join(unsupported)} records but model {cfg.model} supports only "
            f"{', '.join(modality_label(m) for m in meta_model.modalities)}. Use a model that supports "
            f"{', '.join(unsupported)} (e.g. a CLIP or Qwen3-VL embedder for images), filter those records out, "
            "or pass --on-unsupported error-row to write them as error rows and embed the rest."
        )
    if not cfg.split_modalities and cfg.on_unsupported == "fail":
        from mmembed.stages.read import sample_record_modalities

        combined = sorted(
            label
            for label in sample_record_modalities(spec, cfg.storage_options)
            if "+" in label and not meta_model.supports(tuple(label.split("+")))
        )
        if combined:
            raise UsageError(
                f"the input has records combining {', '.join(combined)} (several modality cells in one row), "
                f"but model {cfg.model} cannot embed modalities together: it does not support `message` "
                "inputs. Pass --split-modalities to embed each modality separately (one row per id and "
                "modality, ids `<id>#<modality>`), --modalities to embed only some of them (e.g. `image`), use a "
                "model that supports messages (e.g. a Qwen3-VL embedder), or pass --on-unsupported error-row to "
                "write such records as error rows."
            )
    multi_vector = multi_vector_plan(cfg, meta_model) if multi else None
    task = multi_vector["task"] if multi else cfg.task
    try:
        prompt = resolve_prompt(meta_model, task, cfg.prompt_name, cfg.prompt)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if cfg.decode_on_device:
        from mmembed.media.device_decode import unsupported_reason

        why = unsupported_reason(meta_model)
        if why:
            raise UsageError(f"--decode-on-device cannot serve model {cfg.model}: {why}. Drop the option; the "
                             "CPU pool then decodes every image.")
    device_decode = device_decode_plan(cfg) if cfg.decode_on_device else None
    fast_decode = fast_decode_edge(cfg, meta_model) if cfg.fast_decode else None
    dim = meta_model.get_embedding_dimension()
    pixels = pixel_transport(cfg, spec, meta_model, prompt, task)
    if cfg.truncate_dim:
        dim = min(dim, cfg.truncate_dim)
    quantization = quantization_plan(cfg, dim)
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
        "pixels": pixels,
        "task": task,
        "precision": cfg.precision,
        **({"fast_decode": {"edge": fast_decode}} if fast_decode else {}),
        **({"device_decode": device_decode} if device_decode else {}),
        **({"multi_vector": multi_vector} if multi else {}),
    }
    if quantization and quantization["ranges"] is None and not cfg.overwrite:
        # A resumed run quantises with the ranges its first attempt calibrated, never fresh ones.
        recorded = ((read_json(join_uri(cfg.output, RUN_NAME), cfg.storage_options) or {}).get("identity") or {})
        before = recorded.get("quantization") or {}
        if {k: v for k, v in before.items() if k != "ranges"} == {k: v for k, v in quantization.items() if k != "ranges"}:
            quantization["ranges"] = before.get("ranges")
    if cfg.pdf_dpi or cfg.max_pages:
        out["documents"] = {"pdf_dpi": cfg.pdf_dpi, "max_pages": cfg.max_pages}
    out["executor"] = choose_executor(cfg, spec, standin=standin)
    if quantization and quantization["calibration"] and quantization["ranges"] is None and cfg.executor == "auto":
        out["executor"] = "ray"  # calibration is a pass of the Ray pipeline of its own
    # A rerun into the same output resumes (or finds it complete); another model, prompt or input refuses.
    out["identity"] = run_identity(cfg, out)
    out["state"] = inspect_output(cfg.output, out["identity"], cfg.storage_options, overwrite=cfg.overwrite)
    return out


def device_decoder_kwargs(p: dict) -> dict:
    decode = p.get("device_decode")
    return {"device_decoder": decode["decoder"], "hw_decode_share": decode.get("hw_share")} if decode else {}


def device_decode_plan(cfg) -> dict:
    """--decode-on-device's decoder (--device-decoder resolved here, on the driver) and its hardware share."""
    from mmembed.media.device_decode import resolve_decoder

    if not 0.0 <= cfg.hw_decode_share <= 1.0:
        raise UsageError(f"--hw-decode-share is a share of each batch, 0 to 1; got {cfg.hw_decode_share}.")
    try:
        decoder = resolve_decoder(cfg.device_decoder)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return {"decoder": decoder, **({"hw_share": cfg.hw_decode_share} if decoder == "nvimgcodec" else {})}


def fast_decode_edge(cfg, meta_model) -> int:
    """--fast-decode's target: the shorter side the model's image processor resizes to. UsageError where it
    resizes otherwise (a pixel budget, as Qwen-VL's), or where the images are decoded on the device."""
    from mmembed.media.device_decode import image_processor

    if cfg.decode_on_device:
        raise UsageError("--fast-decode and --decode-on-device exclude each other: pick one.")
    ip = image_processor(meta_model)
    size = getattr(ip, "size", None) or {}

    def get(key):  # a dict, or transformers' SizeDict
        return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

    budget = get("longest_edge") or get("max_pixels") or get("height") or get("width")
    edge = get("shortest_edge") if not budget else None
    if not ip or not getattr(ip, "do_resize", True) or not isinstance(edge, int):
        raise UsageError(
            f"--fast-decode needs an image processor that resizes to a shortest edge (CLIP-style); {cfg.model}'s "
            f"resizes to {dict(size) if isinstance(size, dict) else size}. Drop --fast-decode."
        )
    return edge


def multi_vector_plan(cfg, meta_model) -> dict:
    """What a multi-vector run stores: which side's vectors (documents unless --task query, as
    encode_document / encode_query), their precision and the token pooling. Raises UsageError for the
    single-vector options that have no meaning for token vectors."""
    from mmembed.stages.encode_multi import MULTI_VECTOR_PRECISIONS

    if cfg.precision not in MULTI_VECTOR_PRECISIONS:
        raise UsageError(
            f"--precision {cfg.precision} quantises one vector per record; {cfg.model} is a multi-vector model. "
            f"Use --precision float16 to halve the bytes, or --token-pool-factor to store fewer vectors."
        )
    for flag, given in (("--truncate-dim", cfg.truncate_dim), ("--keep-float", cfg.keep_float),
                        ("--calibration-embeddings", cfg.calibration_embeddings),
                        ("--decode-on-device", cfg.decode_on_device)):
        if given:
            raise UsageError(f"{flag} serves single-vector models; {cfg.model} is a multi-vector model. Drop {flag}.")
    if cfg.token_pool_factor is not None and cfg.token_pool_factor < 1:
        raise UsageError(f"--token-pool-factor must be >= 1 (1 keeps every vector), got {cfg.token_pool_factor}.")
    if cfg.token_pool_protected < 0:
        raise UsageError(f"--token-pool-protected must be >= 0, got {cfg.token_pool_protected}.")
    task = cfg.task or "document"
    pooled = bool(cfg.token_pool_factor and cfg.token_pool_factor > 1 and task == "document")
    return {
        "task": task,
        "similarity_fn_name": meta_model.similarity_fn_name,
        "token_pooling": {"method": "hierarchical", "pool_factor": cfg.token_pool_factor,
                          "protected_tokens": cfg.token_pool_protected} if pooled else None,
    }


def multi_vector_counts(p: dict, totals: dict) -> dict:
    """The plan's multi-vector settings and what the committed shards hold: vectors, and bytes per record
    (as stored, compressed, and as vectors in memory), which is what a user plans storage with."""
    written = max(totals["written"], 1)
    vectors = totals.get("token_values", 0) // p["dim"]
    itemsize = 2 if p["precision"] == "float16" else 4
    return {
        **p["multi_vector"],
        "vectors": vectors,
        "vectors_per_record": round(vectors / written, 2),
        "bytes_per_record": round(vectors * p["dim"] * itemsize / written, 1),
        "stored_bytes_per_record": round(totals.get("token_bytes", 0) / written, 1),
    }


def pixel_transport(cfg, spec, meta_model, prompt, task=None) -> dict:
    """How image pixels cross from the CPU pool to the encoders: uint8 with the processor's rescale and
    normalise moved to the encoder's device where that is exact (mmembed/models/pixel_tail.py), else the
    processor's float output; recorded in the manifest."""
    if cfg.transport_dtype:
        return {"transport": cfg.transport_dtype, "reason": "--transport-dtype"}
    if not spec.documents and not ({"image", "message", "pdf"} & {str(m) for m in spec.modalities}):
        return {"transport": "float32", "reason": "no image inputs"}
    from mmembed.models.pixel_tail import check

    return check(meta_model, prompt, task)


def quantization_plan(cfg, dim: int) -> dict | None:
    """What a quantised --precision stores (None for float precisions); int8/uint8 ranges when known up front."""
    from mmembed.stages.encode import FLOAT_COLUMN, QUANTIZED, stored_dim

    if cfg.precision not in QUANTIZED:
        if cfg.keep_float or cfg.calibration_embeddings:
            raise UsageError(
                "--keep-float and --calibration-embeddings apply to a quantised --precision "
                "(int8, uint8, binary, ubinary); drop them or choose one."
            )
        return None
    binary = cfg.precision in ("binary", "ubinary")
    if binary and dim % 8:
        raise UsageError(
            f"--precision {cfg.precision} packs 8 dimensions per byte, but the embeddings have {dim} dimensions; "
            "choose a --truncate-dim that is a multiple of 8, or --precision int8/uint8."
        )
    calibration = None
    ranges = None
    if not binary:
        if cfg.calibration_embeddings:
            calibration = {"embeddings": cfg.calibration_embeddings}
            ranges = ranges_from_output(cfg.calibration_embeddings, cfg, dim)
        else:
            calibration = {"records": cfg.calibration_records}
    return {
        "precision": cfg.precision,
        "stored_dim": stored_dim(dim, cfg.precision),
        "packed_bits": binary,
        "calibration": calibration,
        "float_column": FLOAT_COLUMN if cfg.keep_float else None,
        "ranges": ranges,
    }


def ranges_from_output(uri: str, cfg, dim: int) -> list:
    """int8/uint8 ranges ([2][dim]: per-dimension min, max) over the float vectors of a finished embed output."""
    import pyarrow.parquet as pq

    from mmembed.schema import embedding_matrix
    from mmembed.stages.encode import update_ranges
    from mmembed.storage.fs import filesystem

    m = read_json(join_uri(uri, MANIFEST_NAME), cfg.storage_options)
    model = (m or {}).get("model", {})
    if not m or m.get("job") != "embed" or m.get("status") != "complete":
        raise UsageError(f"--calibration-embeddings {uri} is not a finished `mmembed embed` output.")
    if model.get("precision") not in ("float32", "float16") or model.get("dim") != dim or model.get("name") != cfg.model:
        raise UsageError(
            f"--calibration-embeddings {uri} holds {model.get('precision')} vectors of dim {model.get('dim')} from "
            f"{model.get('name')}; calibration needs float vectors of dim {dim} from {cfg.model}."
        )
    ranges = None
    for f in m.get("files", []):
        fs, path = filesystem(join_uri(uri, f["name"]), cfg.storage_options)
        with fs.open(path, "rb") as fh:
            for batch in pq.ParquetFile(fh).iter_batches(columns=["embedding"]):
                ranges = update_ranges(ranges, embedding_matrix(batch.column(0), dim))
    if ranges is None:
        raise UsageError(f"--calibration-embeddings {uri} holds no vectors.")
    return ranges.tolist()


# --------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------
def encode_precision(cfg, p: dict) -> dict:
    """The encoder's storage precision: --precision and, when quantising, the corpus's ranges."""
    q = p.get("quantization") or {}
    return {"precision": cfg.precision, "ranges": q.get("ranges"), "keep_float": bool(q.get("float_column"))}


def stages(cfg: EmbedConfig, p: dict, res: dict, *, skip=None, limit: int | None = None, encode: dict | None = None,
           passthrough: tuple[str, ...] = ()) -> list:
    """The stages after the read: [split] -> [skip committed] -> [limit] -> preprocess -> encode.

    `skip` is the committed records' index (resuming), `limit` keeps a sample (calibration),
    `encode` overrides the stored precision, `passthrough` names record columns carried to each
    result row (reembed's content_hash).
    """
    from mmembed.executors.cluster import cpu_pool, device_pool
    from mmembed.outputs.runstate import drop_committed
    from mmembed.stages.encode import EncodeStage
    from mmembed.stages.encode_multi import MultiVectorEncodeStage
    from mmembed.stages.preprocess import PreprocessStage
    from mmembed.stages.read import split_modalities

    out = []
    if cfg.split_modalities:
        out.append(Stage(split_modalities, resources={"num_cpus": 0.25}))
    if skip is not None:
        out.append(Stage(drop_committed, kwargs={"index": skip}, resources={"num_cpus": 0.25}))
    if limit:
        out.append(Limit(limit))
    decode_on_device = cfg.decode_on_device
    task = p.get("task", cfg.task)
    frames = p.get("pixels", {}).get("transport") == "uint8" and p.get("pixels", {}).get("layout") == "frames"
    out.append(Stage(
        PreprocessStage, args=(p["model_spec"],),
        kwargs={"task": task, "prompt_name": cfg.prompt_name, "prompt": cfg.prompt,
                "decode_on_device": decode_on_device, **fetch_kwargs(cfg),
                "pdf_dpi": cfg.pdf_dpi, "max_pages": cfg.max_pages, "skip": skip,
                "uint8_pixels": p.get("pixels", {}).get("transport") == "uint8", "pixel_frames": frames,
                "fast_decode_edge": (p.get("fast_decode") or {}).get("edge"),
                **({"passthrough": tuple(passthrough)} if passthrough else {})},
        pool=CPU, batch_size=cfg.preprocess_batch_size, actors=res["num_preprocessors"], resources=cpu_pool(cfg, res),
    ))
    multi = p.get("multi_vector")
    pooling = (multi or {}).get("token_pooling") or {}
    head = {"pool_factor": pooling.get("pool_factor"), "protected_tokens": pooling.get("protected_tokens", 1),
            "precision": cfg.precision} if multi else {"truncate_dim": cfg.truncate_dim, "decode_on_device": decode_on_device,
                                                         **device_decoder_kwargs(p),
                                                         **encode_precision(cfg, p)}
    out.append(Stage(
        MultiVectorEncodeStage if multi else EncodeStage, args=(p["model_spec"],),
        kwargs={"device": res["device"], "batch_size": cfg.batch_size, "task": task, "normalize": cfg.normalize,
                "max_batch_tokens": cfg.max_batch_tokens,
                "max_batch_patches": cfg.max_batch_patches, "compile": cfg.compile, "copy_mode": cfg.copy_mode,
                "pixel_frames": frames, **head, **(encode or {}),
                **({"passthrough": tuple(passthrough)} if passthrough else {})},
        pool=DEVICE, batch_size=cfg.encode_window or cfg.batch_size, actors=res["num_encoders"],
        calls=res.get("calls_per_encoder", 1), resources=device_pool(cfg, res),
    ))
    return out


def source(cfg, p: dict, ex, records=None):
    """The records entering the stages: the input read in blocks (or `records`, a dataset a caller
    prepared, such as reembed's diff). Ray: a dataset; local: an iterator of Arrow tables."""
    from mmembed.executors.cluster import block_rows
    from mmembed.stages.read import ReadStage

    if ex.local:
        # Blocks of a few encoder batches: the producer preprocesses the next while this one encodes.
        rows = max(cfg.preprocess_batch_size, cfg.encode_window or 4 * cfg.batch_size)
        if records is not None:
            return (t.slice(i, rows) for t in records for i in range(0, t.num_rows, rows))
        return ReadStage(p["input"], cfg.storage_options, block_rows=rows).tables()
    rows = block_rows(p["input"], ex.res["num_preprocessors"], cfg.preprocess_batch_size)
    if records is not None:
        return records.repartition(target_num_rows_per_block=rows)
    return ReadStage(p["input"], cfg.storage_options, block_rows=rows).dataset()


def calibrate(job: "EmbedJob", p: dict, ex) -> list:
    """int8/uint8 ranges from the first --calibration-records records, embedded by the same pipeline in float32.

    The ranges hold for the whole corpus: per-batch ranges would make vectors of different
    batches incomparable. Only a running min/max reaches the driver, never the vectors.
    """
    import pyarrow.compute as pc

    from mmembed.executors.pipeline import apply_ray
    from mmembed.schema import embedding_matrix
    from mmembed.stages.encode import update_ranges

    cfg = job.cfg
    n = cfg.calibration_records
    float32 = {"precision": "float32", "ranges": None, "keep_float": False}
    ds = apply_ray(source(cfg, p, ex), job.with_stand_ins(stages(cfg, p, ex.res, limit=n, encode=float32)))
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
    log.info("calibrated %s ranges on %d embeddings", cfg.precision, count)
    return ranges.tolist()


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------
class EmbedJob(Job):
    name = "embed"
    results = "embeddings"

    def plan(self) -> dict:
        from mmembed.outputs.ownership import check_output

        cfg = self.cfg
        check_output("embed", cfg.output, cfg.storage_options, overwrite=cfg.overwrite,
                     inputs={"--input": cfg.input, "--calibration-embeddings": cfg.calibration_embeddings})
        return plan(cfg, standin=bool(self.replacements))

    def finished(self, p: dict) -> int | None:
        cfg = self.cfg
        if p["state"] != "complete":
            return None
        existing = read_json(join_uri(cfg.output, MANIFEST_NAME), cfg.storage_options)
        errors = existing.get("counts", {}).get("errors", 0)
        if cfg.retry_errors and errors:
            return None
        print(report("mmembed embed", existing, cfg.output), flush=True)
        hint = f"; --retry-errors embeds its {errors:,} error row(s) again" if errors else ""
        print(f"mmembed embed: {cfg.output} already holds this run, complete; nothing to do "
              f"(--overwrite recomputes it{hint}).", flush=True)
        return EXIT_OK

    def executor(self, p: dict) -> str:
        return p["executor"]

    def execute(self, p: dict, ex) -> Outcome:
        from mmembed.outputs.ownership import clear_owned
        from mmembed.outputs.runstate import (
            account,
            begin_attempt,
            committed_index,
            committed_shards,
            drop_error_shards,
        )

        cfg = self.cfg
        q = p.get("quantization")
        if q and q["calibration"] and q["ranges"] is None:
            q["ranges"] = calibrate(self, p, ex)
            p["identity"]["quantization"] = q
        if cfg.overwrite:
            clear_owned("embed", cfg.output, cfg.storage_options)
        token = uuid.uuid4().hex[:8]
        p["run_state"] = begin_attempt(cfg.output, p["identity"], cfg.storage_options, token, p["state"] != "new")
        retried = 0
        if cfg.retry_errors and p["state"] != "new":
            retried = drop_error_shards(cfg.output, cfg.storage_options)
            if retried:
                log.info("--retry-errors: %d error row(s) of earlier attempts are embedded again", retried)
        paths, error_paths = committed_shards(cfg.output, cfg.storage_options)
        already, skip = 0, None
        if paths or error_paths:
            skip, already = ex.call_keeping(committed_index, paths, error_paths, cfg.storage_options)
            log.info("resuming: %d record(s) already committed in %d shard(s) are skipped",
                     already, len(paths) + len(error_paths))
        columns = ["id", "embedding", "modality"] + ([q["float_column"]] if q and q["float_column"] else [])
        sink = ex.sink(cfg.output, columns, cfg, run_token=token)
        written = ex.write(source(cfg, p, ex), self.with_stand_ins(stages(cfg, p, ex.res, skip=skip)), sink)
        # Every committed shard counts, this attempt's and earlier ones'.
        totals = ex.call(account, *committed_shards(cfg.output, cfg.storage_options), cfg.storage_options)
        totals["encoders"] = written.get("encoders", {})  # this attempt's encoders only
        spec = p["input"]
        # Shards are counted as they are read: each record, and each shard's fault, is a row.
        records = totals["written"] + totals["errors"] if spec.estimated else spec.num_records
        # With --split-modalities a record yields one row per modality: rows no longer count records.
        unaccounted = None if cfg.split_modalities or spec.estimated else records - totals["written"] - totals["errors"]
        manifest = {
            "model": {
                "name": cfg.model,
                "revision": p["revision"],
                "dim": p["dim"],
                "normalize": bool(cfg.normalize or p["has_normalize_module"]),
                "normalize_flag": cfg.normalize,
                "similarity_fn_name": p["similarity_fn_name"],
                "task": p["task"],
                "prompt_name": cfg.prompt_name,
                "prompt": p["prompt"],
                "precision": cfg.precision,
                "quantization": q,
                "truncate_dim": cfg.truncate_dim,
                "model_kwargs": cfg.model_kwargs,
                "processor_kwargs": cfg.processor_kwargs,
                "modalities": [modality_label(m) for m in p["modalities"]],
                "pixels": p.get("pixels"),
                **({"fast_decode": {**p["fast_decode"], "equal_to_st": False}} if p.get("fast_decode") else {}),
                **({"device_decode": p["device_decode"]} if p.get("device_decode") else {}),
                **({"multi_vector": multi_vector_counts(p, totals)} if p.get("multi_vector") else {}),
            },
            "input": {"uri": cfg.input, "kind": p["input"].kind, "fingerprint": p["input"].fingerprint,
                      "records": records, **p["input"].mapping.describe(),
                      **({"shards": len(spec.paths)} if spec.kind == "webdataset" else {}),
                      **({"documents": spec.documents} if spec.documents else {})},
            "output": {"uri": cfg.output, "shard_rows": cfg.shard_rows},
            "counts": {
                "records": records,
                "written": totals["written"],
                "errors": totals["errors"],
                "unaccounted": unaccounted,
                "by_modality": totals["modalities"],
                "duplicate_ids": totals["duplicate_ids"],
                # PDFs: documents in the input, and their pages written or failed.
                **({"documents": spec.documents, "pages": totals["pages"]} if spec.documents or totals.get("pages")
                   else {}),
                "resumed_from_committed": already,
                "retried_errors": retried,
            },
            "attempts": p["run_state"]["attempts"],
        }
        failed = totals["errors"] / max(totals["written"] + totals["errors"], 1) if unaccounted is None else None
        return Outcome(manifest, totals, failed_fraction=failed)

    def commit(self, p: dict, manifest: dict) -> dict:
        from mmembed.outputs.runstate import finish_attempt

        manifest = super().commit(p, manifest)
        finish_attempt(self.cfg.output, p["run_state"], self.cfg.storage_options)
        return manifest

    def report(self, manifest: dict, output: str) -> str:
        text = super().report(manifest, output)
        errors = manifest["counts"]["errors"]
        if errors:
            text += (f"\n  retry    once their cause is fixed (see _errors), rerun this command with --retry-errors "
                     f"to embed the {errors:,} error record(s) again")
        return text
