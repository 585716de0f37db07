"""Pinned host buffers an encoder actor keeps and reuses for its host-to-device copies.

Pinning host memory is a system call that locks pages, and PyTorch's pinned-memory tutorial
reports that pinning each batch afresh can cost more than the plain copy it speeds up. An actor
copies batches of the same few shapes all day, so it keeps its pinned buffers: one per size class
(powers of two), taken for a copy and returned when the copy's event has completed. The copy runs
on a side stream that the compute stream waits on, so it overlaps the host's work on the next
batch and the forward pass of the previous one.
"""

from __future__ import annotations

import contextlib
import threading

# Smallest buffer kept: small tensors (masks, grids) share a class rather than each pinning pages.
MIN_CLASS_BYTES = 64 * 1024


def size_class(nbytes: int) -> int:
    """The buffer size that serves a tensor of `nbytes`: the next power of two, at least MIN_CLASS_BYTES."""
    return max(MIN_CLASS_BYTES, 1 << max(0, nbytes - 1).bit_length())


class PinnedStaging:
    """Reused pinned buffers and a side copy stream for one CUDA device (thread-safe)."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._lock = threading.Lock()
        self._free: dict[int, list] = {}
        self._in_flight: list = []  # (event, size class, buffer)
        self.allocated = 0  # buffers pinned so far, for tests and the benchmark

    def to_device(self, tensor):
        torch = self.torch
        if tensor.device.type != "cpu":
            return tensor.to(self.device)
        tensor = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0:
            return tensor.to(self.device)
        cls = size_class(nbytes)
        buf = self._take(cls)
        staged = buf[:nbytes].view(tensor.dtype).view(tensor.shape)
        staged.copy_(tensor)
        compute = torch.cuda.current_stream(self.device)
        # No wait on compute: the destination comes from the copy stream's own allocator pool.
        with torch.cuda.stream(self.stream):
            out = staged.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        compute.wait_stream(self.stream)
        out.record_stream(compute)  # allocated on the copy stream, used on the compute stream
        with self._lock:
            self._in_flight.append((done, cls, buf))
        return out

    def _take(self, cls: int):
        with self._lock:
            waiting = []
            for done, c, b in self._in_flight:
                if done.query():
                    self._free.setdefault(c, []).append(b)
                else:
                    waiting.append((done, c, b))
            self._in_flight = waiting
            free = self._free.get(cls)
            if free:
                return free.pop()
            self.allocated += 1
        return self.torch.empty(cls, dtype=self.torch.uint8, pin_memory=True)


class CallStreams:
    """A stream of its own for each call an encoder actor runs at once (--calls-per-encoder).

    Ray runs an actor's concurrent calls on its threads. On the device's default stream their work
    queues in one line: one call's copies and kernels wait for the other's. With a stream each, they
    overlap on the device as two encoder processes' would, without a second copy of the weights or
    two contexts time-slicing the GPU. A call takes a stream when it starts and gives it back when it
    ends (its results are on the host by then); an actor keeps as many streams as calls it ran at once.
    On a CPU device `enter` is a no-op and the streams are only tokens.
    """

    def __init__(self, make, enter):
        self._make = make
        self._enter = enter
        self._free: list = []
        self._lock = threading.Lock()
        self.created = 0  # streams made so far: the most calls this actor ran at once

    @classmethod
    def for_device(cls, device) -> "CallStreams":
        if getattr(device, "type", str(device)) != "cuda":
            return cls(object, lambda stream: contextlib.nullcontext())
        import torch

        return cls(lambda: torch.cuda.Stream(device), torch.cuda.stream)

    @contextlib.contextmanager
    def stream(self):
        with self._lock:
            if self._free:
                stream = self._free.pop()
            else:
                stream = self._make()
                self.created += 1
        try:
            with self._enter(stream):
                yield stream
        finally:
            with self._lock:
                self._free.append(stream)
