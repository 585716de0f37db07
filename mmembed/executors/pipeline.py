"""A job's stages as declarations, and the one place that applies them, on Ray Data or in-process.

A job builds its list of `Stage`s once (mmembed/jobs/<job>.py). `apply_ray` turns the list into
Ray Data operators; `stream_local` runs the same list in this process (mmembed/executors/local.py). No job
calls `map_batches` itself, so pools, restarts and resources are set the same way everywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import pyarrow as pa

# Pools. cpu: an actor pool of stage objects built once per actor (decode, preprocess, hash).
# device: an actor pool holding a model on its GPU (or CPU); a lost actor is restarted and its
# batches retried. task: a plain function of a block, run as stateless Ray tasks. dataset: a
# function of the whole dataset (a shuffle such as rank's group-by); in this process, its `local`
# form takes every block that reached it (inputs small enough to run here are small enough to hold).
CPU, DEVICE, TASK, DATASET = "cpu", "device", "task", "dataset"
POOLS = (CPU, DEVICE, TASK, DATASET)


@dataclass(frozen=True)
class Stage:
    """One step of a job: what runs, with which arguments, where, and how many rows at a time."""

    fn: Callable
    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    pool: str = TASK
    batch_size: int | None = None  # rows per call; None: whole blocks
    actors: int = 1  # cpu and device pools
    calls: int = 1  # device pools: concurrent calls per actor, on the actor's threads
    resources: Mapping[str, Any] = field(default_factory=dict)  # Ray remote args: num_cpus, num_gpus, memory...
    local: Callable | None = None  # dataset pools: the same step over an iterable of blocks, in this process

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ValueError(f"pool {self.pool!r} is not one of {POOLS}")

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", type(self.fn).__name__)

    def build(self) -> Callable[[pa.Table], pa.Table]:
        """The callable the local executor applies to each block."""
        if self.pool in (CPU, DEVICE):
            return self.fn(*self.args, **self.kwargs)
        fn, args, kwargs = self.fn, self.args, dict(self.kwargs)
        return lambda block: fn(block, *args, **kwargs)


@dataclass(frozen=True)
class Limit:
    """Keep only the first `rows` rows (calibration embeds a sample of the corpus). Ray only."""

    rows: int


def replace(stages: list, old: type, new: Callable, **kwargs) -> list:
    """The list with every stage running `old` running `new` instead, with `kwargs` added to its
    arguments: how a benchmark or a test puts a stand-in encoder into a real job."""
    out = [dataclasses.replace(s, fn=new, kwargs={**s.kwargs, **kwargs}) if isinstance(s, Stage) and s.fn is old else s
           for s in stages]
    if out == stages:
        raise ValueError(f"no stage runs {old.__name__}")
    return out


def _actor_pool(stage: Stage):
    from ray.data import ActorPoolStrategy

    if stage.calls == 1:
        return ActorPoolStrategy(size=stage.actors)
    # Each call syncs with the device once, at its end; meanwhile another call collates and queues
    # its batch, so the device never idles on the host's per-batch work.
    return ActorPoolStrategy(
        size=stage.actors,
        max_concurrent_calls_per_actor=stage.calls,
        enable_true_multi_threading=True,
        max_tasks_in_flight_per_actor=stage.calls + 1,  # a block waiting for each thread
    )


def apply_ray(ds, stages: list):
    """`ds` through every stage, as lazy Ray Data operators."""
    for s in stages:
        if isinstance(s, Limit):
            ds = ds.limit(s.rows)
        elif s.pool == DATASET:
            ds = s.fn(ds, *s.args, **s.kwargs)
        elif s.pool == TASK:
            ds = ds.map_batches(s.fn, fn_args=s.args, fn_kwargs=dict(s.kwargs), batch_size=s.batch_size,
                                batch_format="pyarrow", **s.resources)
        else:
            # A lost actor is restarted and its batches retried: Ray Data's own default for actor pools
            # (max_restarts=-1, max_task_retries=-1), which the named parameters leave as it is.
            ds = ds.map_batches(s.fn, fn_constructor_args=s.args, fn_constructor_kwargs=dict(s.kwargs),
                                batch_size=s.batch_size, batch_format="pyarrow", compute=_actor_pool(s),
                                **s.resources)
    return ds


def stream_local(blocks: Iterable[pa.Table], stages: list) -> Iterable[pa.Table]:
    """`blocks` through `stages` in this process, lazily: what `apply_ray` is on Ray.

    Between dataset stages, stages before the first device stage run on a producer thread, the rest
    on this one, so decoding overlaps the forward pass (mmembed/executors/local.py); a dataset stage
    runs its `local` form over the blocks that reach it.
    """
    from mmembed.executors.local import LocalExecutor

    for s in stages:
        if isinstance(s, Limit) or (s.pool == DATASET and s.local is None):
            raise ValueError(f"{s} runs on Ray only; use the Ray executor")
    stream: Iterable[pa.Table] = blocks
    segment: list[Stage] = []
    for s in [*stages, None]:
        if s is not None and s.pool != DATASET:
            segment.append(s)
            continue
        if segment:
            first_device = next((i for i, x in enumerate(segment) if x.pool == DEVICE), len(segment))
            built = [x.build() for x in segment]
            stream = LocalExecutor(built[:first_device], built[first_device:]).results(stream)
            segment = []
        if s is not None:
            stream = s.local(stream, *s.args, **s.kwargs)
    return stream
