"""Where a job runs: starting Ray, choosing the executor, sizing the actor pools.

Everything here reads a job configuration's compute options (mmembed/jobs/config.py) and the
cluster's CPUs and GPUs; nothing loads a model.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from mmembed.errors import JobError, UsageError

logger = logging.getLogger(__name__)

# Records one preprocess actor should have to itself before another is worth starting: an actor
# start costs seconds of imports and model load, which a few thousand images or tens of
# thousands of texts repay (benchmarks/RESULTS.md, "executor").
RECORDS_PER_PREPROCESSOR = {"media": 2_000, "text": 20_000}
# What a preprocess actor holds (torch, transformers, the processor, a batch of decoded images): Ray
# showed about 944 MiB each on Qwen3-VL screenshots (benchmarks/RESULTS.md, GPU); reserved per actor.
PREPROCESS_MEMORY = 1 << 30
# A PDF's actor also holds pdfium's document and rendered pages: Ray measured 1.1-1.2 GiB per actor on 8-page
# PDFs of screenshots (benchmarks/RESULTS.md, "Channel-first views").
PDF_PREPROCESS_MEMORY = 3 << 29

# Media records cost milliseconds each to decode and preprocess, text records microseconds:
# media blocks stay small enough that the last ones do not leave the pool waiting on a straggler.
MAX_BLOCK_ROWS = {"media": 256, "text": 2_000}


@dataclass(frozen=True)
class InputSize:
    """What sizing reads of an input that is not one manifest (rerank's pairs, search's queries): how
    many records, and their modalities."""

    num_records: int
    modalities: tuple[str, ...] = ()


def workload(spec) -> str:
    """"media" when any record needs fetching and decoding beyond text, else "text"."""
    return "media" if set(spec.modalities) - {"text"} else "text"


def block_rows(spec, preprocessors: int, batch_size: int) -> int:
    """Rows per block entering the preprocess pool: about four blocks per actor, within bounds."""
    cap = MAX_BLOCK_ROWS[workload(spec)]
    want = -(-max(spec.num_records, 1) // (4 * max(preprocessors, 1)))
    return max(batch_size, min(cap, want))


def choose_executor(cfg, spec, *, standin: bool = False) -> str:
    """"ray" or "local" for --executor (see its help); refuses a local run on a cluster."""
    wanted = cfg.executor
    on_cluster = bool(cfg.address or os.environ.get("RAY_ADDRESS"))
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
    if cfg.num_preprocessors or cfg.num_encoders or standin:
        return "ray"
    return "local" if spec.num_records <= RECORDS_PER_PREPROCESSOR[workload(spec)] else "ray"


def check_ray_address(address: str | None) -> None:
    """Refuse a cluster address nothing listens on; `ray.init` would wait on it for minutes."""
    import socket

    if not address or address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise UsageError(
            f"cannot reach the Ray cluster at {address} ({exc}). Check --address / $RAY_ADDRESS; "
            "nothing was run or modified."
        ) from None


def init_ray(address: str | None) -> str:
    """Ray for this job: the one already started in this process, the cluster at `address`, or an
    in-process one. Returns which, for the manifest."""
    import ray
    from ray.data import DataContext

    if ray.is_initialized():
        where = "existing"
    else:
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
            where = address
        else:
            ray.init(include_dashboard=False, logging_level=logging.WARNING)
            where = "embedded"
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.enable_operator_progress_bars = True
    return where


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def live_resources(timeout_s: float = 10.0, dead_wait_s: float = 90.0) -> dict[str, float]:
    """The resources (CPU, GPU, custom) of the nodes that answer now, summed: what pools are planned from.

    A node lost moments ago is still listed alive by Ray until its health checks fail (15-30 s), and
    `ray.cluster_resources()` still counts it: pools sized for it can never all be placed, and Ray Data
    places its own tasks and actors (file listing, Parquet footers) on it, which then die with it. So on
    a cluster of several nodes each listed node runs a trivial task pinned to it (no CPU asked); a node
    that does not answer within `timeout_s` is left out of the plan, and the job starts only once Ray
    has marked it dead (at most `dead_wait_s`). One node (an in-process Ray): no probe.
    """
    import time

    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = ray.remote(num_cpus=0, max_retries=0)(_node_id)
        refs = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(): n
                for n in nodes}
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        lost = {refs[r]["NodeID"]: refs[r].get("NodeManagerAddress") for r in late}
        for ref in late:
            ray.cancel(ref, force=True)
        if lost:
            listed = sum(n.get("Resources", {}).get("CPU", 0) for n in nodes)
            answering = sum(refs[r].get("Resources", {}).get("CPU", 0) for r in ready)
            logger.warning("node(s) %s did not answer within %g s: left out of this job's plan (Ray lists %g CPUs, "
                           "the answering nodes have %g); waiting up to %g s for Ray to mark them dead before the "
                           "job starts", sorted(lost.values()), timeout_s, listed, answering, dead_wait_s)
            deadline = time.monotonic() + dead_wait_s
            while time.monotonic() < deadline and any(n.get("Alive") and n["NodeID"] in lost for n in ray.nodes()):
                time.sleep(1.0)
        nodes = [refs[r] for r in ready]
    total: dict[str, float] = {}
    for n in nodes:
        for key, value in n.get("Resources", {}).items():
            total[key] = total.get(key, 0.0) + value
    return total


def check_placement(res: dict, cfg, timeout_s: float) -> None:
    """Raise JobError unless the planned pools can be placed on the cluster within `timeout_s`.

    Ray Data would otherwise wait for actors that cannot be placed, warning once that the job "may
    hang forever". A placement group of one bundle per planned actor is asked for and removed at once:
    it asks no more than the pools will, and an autoscaler sees it as demand.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    def bundle(remote: dict) -> dict:
        out = {"CPU": remote.get("num_cpus") or 0, "GPU": remote.get("num_gpus") or 0,
               "memory": remote.get("memory") or 0, **remote.get("resources", {})}
        return {k: v for k, v in out.items() if v}

    bundles = [bundle(cpu_pool(cfg, res))] * res["num_preprocessors"] + [bundle(device_pool(cfg, res))] * res["num_encoders"]
    bundles = [b for b in bundles if b]
    if not bundles or timeout_s <= 0:
        return
    pg = placement_group(bundles, strategy="PACK")
    try:
        placed = pg.wait(timeout_seconds=timeout_s)
    finally:
        remove_placement_group(pg)
    if not placed:
        available = {k: round(v, 2) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        raise JobError(
            f"the planned pools ({res['num_preprocessors']} preprocess actors x {cpu_pool(cfg, res)}, "
            f"{res['num_encoders']} encoders x {device_pool(cfg, res)}) could not be placed within "
            f"{timeout_s:g} s (--placement-timeout); the cluster has {available} free now. If a node was just "
            "lost, Ray takes about 30 s to mark it dead: rerun then (a RayJob retry does). Otherwise free "
            "resources, or size the pools to fit (--num-preprocessors, --num-encoders, --cpus-per-*). "
            "Nothing was written."
        )


def plan_resources(cpus: float, gpus: float, cfg, spec=None, memory: float | None = None) -> dict:
    """Actor counts and per-actor resources for the cluster Ray reports.

    One CPU stays unclaimed by the actor pools: Ray Data's file listing takes a whole CPU and
    read/write tasks need a slice, and actors that hold every CPU would starve them forever.
    With the input's InputSpec, a default-sized preprocess pool is no bigger than the input needs.
    Each preprocess actor reserves --memory-per-preprocessor (default PREPROCESS_MEMORY: what one
    measured), so Ray does not pack more onto a node than its memory holds; with the cluster's
    `memory` resource known, a default-sized pool is no bigger than three quarters of it allow.
    """
    device = cfg.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda" and gpus <= 0:
        raise UsageError("--device cuda was asked for but the Ray cluster has no GPUs; use --device cpu or auto.")
    if device == "cuda":
        encoders = cfg.num_encoders or max(1, int(gpus / cfg.gpus_per_encoder))
        enc_cpus = cfg.cpus_per_encoder if cfg.cpus_per_encoder is not None else 1.0
    else:
        encoders = cfg.num_encoders or 1
        enc_cpus = cfg.cpus_per_encoder if cfg.cpus_per_encoder is not None else (1.0 if cpus >= 4 else 0.5)
    free = cpus - 1.0 - encoders * enc_cpus
    pre_cpus = cfg.cpus_per_preprocessor
    if cfg.num_preprocessors:
        preprocessors = cfg.num_preprocessors
    else:
        preprocessors = max(1, int(free // (pre_cpus or 1.0)))
        if device == "cpu" and pre_cpus is None:
            # Even on 2 CPUs two decoders outrun one: a small model's encoder idles most of the
            # time, and a large model's encoder is the bottleneck whatever feeds it. The price is
            # one more actor start.
            preprocessors = max(preprocessors, min(2, int(cpus)))
        # A PDF is one record of pages not yet counted (they are known once rendered): no cap from records.
        if spec is not None and spec.num_records and not (spec.documents or "pdf" in spec.columns):
            # On a GPU node the preprocess actors start while the encoders load their weights, so
            # another actor costs no wall time: only a preprocess batch apiece bounds the pool (the
            # CPU rule of thumb starved an H200, benchmarks/RESULTS.md).
            per_actor = cfg.preprocess_batch_size if device == "cuda" else RECORDS_PER_PREPROCESSOR[workload(spec)]
            preprocessors = min(preprocessors, -(-spec.num_records // per_actor))
    pdfs = spec is not None and bool(spec.documents or "pdf" in spec.columns)
    pre_memory = cfg.memory_per_preprocessor or (PDF_PREPROCESS_MEMORY if pdfs else PREPROCESS_MEMORY)
    if memory and not cfg.num_preprocessors:
        preprocessors = max(1, min(preprocessors, int(0.75 * memory // pre_memory)))
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
        "gpus_per_encoder": cfg.gpus_per_encoder if device == "cuda" else 0,
        "num_preprocessors": preprocessors,
        "cpus_per_preprocessor": pre_cpus,
        "memory_per_preprocessor": pre_memory,
        "calls_per_encoder": cfg.calls_per_encoder or (2 if device == "cuda" else 1),
    }


def local_resources(cfg) -> dict:
    """The in-process executor's "pools": one of each, on this process's device."""
    from mmembed.models.loading import resolve_device

    return {
        "device": resolve_device(cfg.device),
        "num_encoders": 1,
        "cpus_per_encoder": None,
        "gpus_per_encoder": 0,
        "num_preprocessors": 1,
        "cpus_per_preprocessor": None,
    }


def cpu_pool(cfg, res: dict) -> dict:
    """Remote args of a CPU (preprocess) actor."""
    remote = {"num_cpus": res["cpus_per_preprocessor"]}
    if res.get("memory_per_preprocessor") or cfg.memory_per_preprocessor:
        remote["memory"] = res.get("memory_per_preprocessor") or cfg.memory_per_preprocessor
    if cfg.preprocessor_resources:
        remote["resources"] = dict(cfg.preprocessor_resources)
    return remote


def device_pool(cfg, res: dict) -> dict:
    """Remote args of a model (encoder) actor."""
    remote = {"num_cpus": res["cpus_per_encoder"]}
    if res["device"] == "cuda":
        remote["num_gpus"] = res["gpus_per_encoder"]
    if cfg.encoder_resources:
        remote["resources"] = dict(cfg.encoder_resources)
    return remote
