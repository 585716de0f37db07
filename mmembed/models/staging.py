"""Pinned host buffers an encoder actor keeps and reuses for its host-to-device copies.

Pinning host memory is a system call that locks pages, and PyTorch's pinned-memory tutorial
reports that pinning each batch afresh can cost more than the plain copy it speeds up. An actor
copies batches of the same few shapes all day, so it keeps its pinned buffers: one per size class
(powers of two), taken for a copy and returned when the copy's event has completed. The copy runs
on a side stream that the compute stream waits on, so it overlaps the host's work on the next
batch and the forward pass of the previous one.
"""

from __future__ import annotations

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
