"""The in-process executor: the same stages as on Ray, run by one process, for small inputs.

A Ray job pays for its cluster before its first record: the runtime's start and, per actor, a
fresh process that imports torch, transformers and sentence-transformers (seconds each:
benchmarks/RESULTS.md, "A cold job's fixed cost"). An input that would get a single
preprocess actor anyway gains nothing from that, so it runs here instead: the driver, which has
those libraries loaded already, reads, preprocesses, encodes and writes the records itself,
block by block. CPU stages run on a producer thread and the device stage on the calling
thread, with a bounded queue between them, so decode overlaps the forward pass and memory stays
bounded by a few blocks. The stage objects and the writer are the ones the Ray pipeline uses,
so outputs, error rows, shards and resumes are the same.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import pyarrow as pa

_DONE = object()


@dataclass
class _Failed:
    exc: BaseException


@dataclass
class TaskContext:
    """What a Datasink's `write` reads of Ray's task context."""

    task_idx: int = 0
    kwargs: dict = field(default_factory=dict)


@dataclass
class WriteResult:
    """What a Datasink's `on_write_complete` reads of Ray's write result."""

    write_returns: list


class LocalExecutor:
    """Runs `cpu_stages` (producer thread) then `device_stages` (calling thread) over a stream of Arrow
    blocks (`results`). mmembed/executors/pipeline.py's `stream_local` builds both lists from a job's stages."""

    def __init__(self, cpu_stages: list[Callable[[pa.Table], pa.Table]],
                 device_stages: list[Callable[[pa.Table], pa.Table]], *, queue_blocks: int = 2):
        self.cpu_stages = cpu_stages
        self.device_stages = device_stages
        self.queue_blocks = queue_blocks

    def _through(self, block: pa.Table, stages: list) -> Iterator[pa.Table]:
        """`block` through `stages`; a stage may return a table or, as Ray Data allows, a generator of them."""
        if not stages or block.num_rows == 0:
            yield block
            return
        out = stages[0](block)
        for piece in ([out] if isinstance(out, pa.Table) else out):
            yield from self._through(piece, stages[1:])

    def _produce(self, blocks: Iterable[pa.Table], out: queue.Queue, stop: threading.Event) -> None:
        try:
            for source in blocks:
                for block in self._through(source, self.cpu_stages):
                    while block.num_rows and not stop.is_set():
                        try:
                            out.put(block, timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
        except BaseException as exc:  # noqa: BLE001 - re-raised on the consuming thread
            out.put(_Failed(exc))
            return
        out.put(_DONE)

    def results(self, blocks: Iterable[pa.Table]):
        """The device stage's output blocks, in order; an exception in any stage is raised here."""
        q: queue.Queue = queue.Queue(maxsize=self.queue_blocks)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(blocks, q, stop), name="mmembed-cpu-stages",
                                    daemon=True)
        producer.start()
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failed):
                    raise item.exc
                yield from self._through(item, self.device_stages)
        finally:
            stop.set()
            producer.join(timeout=5)


def write(blocks: Iterable[pa.Table], sink) -> None:
    """Blocks into a Datasink, as `Dataset.write_datasink` drives one: start, one write task, complete."""
    sink.on_write_start()
    result = sink.write(blocks, TaskContext())
    sink.on_write_complete(WriteResult([result]))
