"""The figures a benchmark sets mmembed against, measured in the same run on the same files: the
preprocess stage in a spawn process pool, one process per core (the CPU ceiling), the encode stage's
forward on batches already on the device (the GPU ceiling), SentenceTransformer.encode (the user's
baseline), and the cosine parity of mmembed's vectors with ST's."""

from __future__ import annotations

import os
import time

import numpy as np

# ---------------------------------------------------------------------------------------------
# CPU pool: the preprocess stage in one process per core
# ---------------------------------------------------------------------------------------------
_STAGES: dict = {}


def init_worker(stage_args: list) -> None:
    """Preprocess stages keyed (model_dir, transport, on_device): transport "job" runs the stage as the embed job
    does (uint8 pixels and Qwen-VL frames where the plan's check finds them exact), any other value ships the
    processor's float pixels in that dtype (None: float32), which the forward-only ceiling feeds on."""
    import torch

    torch.set_num_threads(1)  # one decode per core, as the preprocess actors run
    from mmembed.models.loading import ModelSpec, load_model
    from mmembed.models.pixel_tail import check
    from mmembed.stages.preprocess import PreprocessStage

    for model_dir, transport, on_device in stage_args:
        spec = ModelSpec(model_dir)
        if transport == "job":
            verdict = check(load_model(spec, weights=False))
            uint8 = verdict["transport"] == "uint8"
            kwargs = {"uint8_pixels": uint8, "pixel_frames": uint8 and verdict.get("layout") == "frames"}
        else:
            kwargs = {"transport_dtype": transport}
        _STAGES[(model_dir, transport, on_device)] = PreprocessStage(spec, decode_on_device=on_device, **kwargs)


def records(paths: list[str], root: str):
    import pyarrow as pa

    from mmembed.inputs.discover import RECORD_SCHEMA

    columns = {f.name: pa.nulls(len(paths), f.type) for f in RECORD_SCHEMA}
    columns["id"] = pa.array([os.path.relpath(p, root) for p in paths], pa.string())
    columns["image_uri"] = pa.array(paths, pa.string())
    return pa.table(columns, schema=RECORD_SCHEMA)


def preprocess_job(job):
    """One preprocess call; returns counts and costs, or the table itself when asked."""
    from mmembed.models.batching import row_cost

    key, paths, root, keep = job
    table = _STAGES[key](records(paths, root))
    if keep:
        return table
    errors = table.column("error").null_count
    rows = [r for r in table.select(["error", "feat_keys", "feat_shapes"]).to_pylist() if r["error"] is None]
    return len(rows), table.num_rows - errors, [row_cost(r) for r in rows]


def pool_preprocess(pool, key, paths: list[str], root: str, chunk: int) -> dict:
    jobs = [(key, paths[i : i + chunk], root, False) for i in range(0, len(paths), chunk)]
    pool.map(preprocess_job, jobs[: pool._processes], chunksize=1)  # warm caches in every worker
    start = time.perf_counter()
    results = pool.map(preprocess_job, jobs, chunksize=1)
    seconds = time.perf_counter() - start
    ok = sum(r[0] for r in results)
    return {
        "img_s": ok / seconds,
        "files": len(paths),
        "ok": ok,
        "errors": sum(r[1] for r in results),
        "costs": [c for r in results for c in r[2]],
    }


# ---------------------------------------------------------------------------------------------
# GPU side, in this process
# ---------------------------------------------------------------------------------------------
def sync_device(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def forward_only(stage, table, device: str, min_seconds: float) -> dict:
    """EncodeStage.embed over the stage's own batches, inputs already on the device."""
    from mmembed.models.batching import plan_batches, row_cost

    rows = [r for r in table.to_pylist() if r["error"] is None]
    costs = [row_cost(r) for r in rows]
    batches = plan_batches(costs, stage.budget)
    on_device = [stage.to_device(stage.collate([rows[i] for i in b])) for b in batches]
    for features in on_device:
        stage.embed(features)
    sync_device(device)
    done, start = 0, time.perf_counter()
    while True:
        for features, batch in zip(on_device, batches):
            stage.embed(features)
            done += len(batch)
        sync_device(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            break
    del on_device
    # The stage's whole call on the same rows (Arrow in, Arrow out, copies included) but no Ray,
    # once per --copy-mode: the gap to `forward` is the host-side cost of one encoder actor, and
    # which mode wins on this card decides the default.
    out = {"img_s": done / elapsed, "batches": len(batches), "rows": len(rows)}
    default = (stage.copy_mode, stage._staging)
    for mode in ("staged", "pinned", "plain"):
        stage.copy_mode = mode
        if mode == "staged" and device == "cuda":
            from mmembed.models.staging import PinnedStaging

            stage._staging = default[1] or PinnedStaging(stage.model.device)
        else:
            stage._staging = None
        best = float("inf")
        for _ in range(3):
            sync_device(device)
            start = time.perf_counter()
            stage(table)
            sync_device(device)
            best = min(best, time.perf_counter() - start)
        out[f"stage_call_{mode}_img_s"] = len(rows) / best
    stage.copy_mode, stage._staging = default
    out["stage_call_img_s"] = out[f"stage_call_{stage.copy_mode}_img_s"]
    return out


def st_encode(model_dir: str, paths: list[str], batch_size: int, device: str, model_kwargs: dict) -> dict:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device=device, model_kwargs=dict(model_kwargs))
    model.encode(paths[: min(len(paths), batch_size)], batch_size=batch_size, show_progress_bar=False)
    sync_device(device)
    start = time.perf_counter()
    emb = model.encode(paths, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True)
    sync_device(device)
    seconds = time.perf_counter() - start
    del model
    return {"img_s": len(paths) / seconds, "embeddings": np.asarray(emb, dtype=np.float32)}


def parity(st_emb: np.ndarray, ids: list[str], by_id: dict) -> dict:
    missing = [i for i in ids if i not in by_id]
    if missing:
        return {"min_cosine": None, "max_abs_diff": None, "missing": len(missing)}
    ours = np.stack([by_id[i] for i in ids]).astype(np.float64)
    ref = st_emb.astype(np.float64)
    cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    return {"min_cosine": float(cos.min()), "max_abs_diff": float(np.abs(ours - ref).max()), "missing": 0}


def free_device(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
