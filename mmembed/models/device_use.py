"""How busy an encoder actor keeps its device, measured by the actor itself.

Every encoder actor times its own forward passes against its wall time (from its first call to
its latest), which works on CPU as on CUDA; on CUDA it also reads the device's utilisation
through NVML (`nvidia-ml-py`, via `torch.cuda.utilization`) when that is installed, and its own
peak memory. The figures ride to the writer in one column of each output block and end up in the
run's manifest, so a starved GPU shows in every run, not only in a benchmark.

This module imports no torch at import time: the writer reads the column without it.
"""

from __future__ import annotations

import json
import platform
import threading
import time
from contextlib import contextmanager

# Each encoder output block's first row carries the actor's running figures (JSON) in this
# column; the writer keeps the latest per actor and never writes the column to a shard.
STATS_COLUMN = "_encoder_stats"
# Seconds between NVML utilisation samples.
SAMPLE_PERIOD_S = 0.5


class DeviceUse:
    """One actor's running figures: forward time, wall time, device utilisation and memory."""

    def __init__(self, device, *, actor: str):
        self.device = device
        self.actor = actor
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self._lock = threading.Lock()
        self.calls = 0
        self.first: float | None = None  # perf_counter at the first call's start
        self.last: float | None = None  # perf_counter at the latest call's end
        self.first_at: float | None = None  # the same two instants in epoch seconds, comparable across actors
        self.last_at: float | None = None
        self.busy_s = 0.0
        self.oom_splits = 0
        self.in_flight = 0  # calls running now on this actor's threads (--calls-per-encoder)
        self.max_in_flight = 0
        self._covered = float("-inf")  # end of the forward time counted so far (overlaps count once)
        self._events: list = []  # CUDA (start, end) event pairs not yet read
        self._samples: list[tuple[float, float]] = []  # (perf_counter, utilisation %)
        self._sampler: threading.Thread | None = None
        self.util_note: str | None = None
        if self.cuda:
            import torch

            self.name = torch.cuda.get_device_name(device)
            # Events are timed against this one, so forward intervals from overlapping calls
            # (--calls-per-encoder) can be merged on one device clock.
            self._origin = torch.cuda.Event(enable_timing=True)
            self._origin.record()
        else:
            self.name = f"cpu ({platform.machine()})"

    # -- called by the stage ------------------------------------------------------------------
    def call_started(self) -> float:
        now = time.perf_counter()
        with self._lock:
            self.calls += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if self.first is None:
                self.first, self.first_at = now, time.time()
                if self.cuda:
                    self._start_sampler()
        return now

    def call_finished(self, started: float) -> None:
        now = time.perf_counter()
        with self._lock:
            self.in_flight -= 1
            self.last = max(self.last or now, now)
            self.last_at = time.time()
            if self._events:
                self._read_events()

    @contextmanager
    def forward(self):
        """Around one batch's forward pass (on CUDA, the time the device spends on it)."""
        if self.cuda:
            import torch

            start = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                with self._lock:
                    self._events.append((start, end))
        else:
            start = time.perf_counter()
            try:
                yield
            finally:
                end = time.perf_counter()
                with self._lock:
                    self._count([(start, end)])

    def out_of_memory(self) -> None:
        with self._lock:
            self.oom_splits += 1

    def snapshot(self) -> dict:
        with self._lock:
            wall = (self.last - self.first) if self.first is not None and self.last is not None else 0.0
            util = [u for t, u in self._samples if self.last is None or t <= self.last]
            snap = {
                "actor": self.actor,
                "device": self.name,
                "calls": self.calls,
                "forward_s": round(self.busy_s, 4),
                "wall_s": round(wall, 4),
                "first_at": self.first_at,
                "last_at": self.last_at,
                "oom_splits": self.oom_splits,
                "max_concurrent_calls": self.max_in_flight,
            }
        if self.cuda:
            import torch

            snap["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
            snap["util_sum"] = sum(util)
            snap["util_samples"] = len(util)
            if self.util_note:
                snap["util_note"] = self.util_note
        return snap

    # -- internals ----------------------------------------------------------------------------
    def _count(self, intervals) -> None:
        """Add forward intervals (seconds on one clock), counting time covered twice once."""
        for start, end in sorted(intervals):
            start = max(start, self._covered)
            if end > start:
                self.busy_s += end - start
            self._covered = max(self._covered, end)

    def _read_events(self) -> None:
        done, waiting = [], []
        for start, end in self._events:
            (done if end.query() else waiting).append((start, end))
        self._events = waiting
        self._count([(self._origin.elapsed_time(s) / 1e3, self._origin.elapsed_time(e) / 1e3) for s, e in done])

    def _start_sampler(self) -> None:
        def sample():
            import torch

            while True:
                try:
                    util = float(torch.cuda.utilization(self.device))
                except Exception as exc:  # noqa: BLE001 - no NVML: the figure is absent, not the job
                    self.util_note = f"no utilisation figure: {type(exc).__name__}: {exc}"
                    return
                with self._lock:
                    self._samples.append((time.perf_counter(), util))
                time.sleep(SAMPLE_PERIOD_S)

        self._sampler = threading.Thread(target=sample, name="mmembed-nvml", daemon=True)
        self._sampler.start()


def latest(snapshots: dict[str, dict], values) -> dict[str, dict]:
    """Merge JSON snapshots (STATS_COLUMN cells) into `snapshots`, keeping each actor's latest."""
    for value in values:
        if value is None:
            continue
        snap = json.loads(value) if isinstance(value, str) else value
        old = snapshots.get(snap["actor"])
        if old is None or (snap["calls"], snap["wall_s"]) >= (old["calls"], old["wall_s"]):
            snapshots[snap["actor"]] = snap
    return snapshots


def summarise(snapshots: dict[str, dict]) -> dict | None:
    """The run's device-use figures from every encoder actor's latest snapshot."""
    snaps = list(snapshots.values())
    if not snaps:
        return None
    forward = sum(s["forward_s"] for s in snaps)
    wall = sum(s["wall_s"] for s in snaps)
    out = {
        "encoders": len(snaps),
        "devices": sorted({s["device"] for s in snaps}),
        "forward_s": round(forward, 3),
        "busy_fraction": round(forward / wall, 4) if wall > 0 else None,
        "oom_splits": sum(s.get("oom_splits", 0) for s in snaps),
        # Most calls one encoder ran at once: 2 shows --calls-per-encoder overlapping them.
        "max_concurrent_calls": max(s.get("max_concurrent_calls", 1) for s in snaps),
    }
    starts = [s["first_at"] for s in snaps if s.get("first_at")]
    ends = [s["last_at"] for s in snaps if s.get("last_at")]
    if starts and ends:
        # From the first encoder call to the last: the job's rate without start-up and model loading.
        out["encode_window_s"] = round(max(ends) - min(starts), 3)
    samples = sum(s.get("util_samples", 0) for s in snaps)
    if any("peak_memory_bytes" in s for s in snaps):
        out["peak_memory_gib"] = round(max(s.get("peak_memory_bytes", 0) for s in snaps) / 2**30, 3)
        out["mean_utilization"] = round(sum(s.get("util_sum", 0) for s in snaps) / samples, 1) if samples else None
        notes = sorted({s["util_note"] for s in snaps if s.get("util_note")})
        if notes:
            out["utilization_note"] = notes[0]
    return out


def describe(use: dict) -> str:
    """One report line."""
    busy = f"{use['busy_fraction']:.0%}" if use.get("busy_fraction") is not None else "n/a"
    line = f"  device   {', '.join(use['devices'])}: forward {busy} of the encoders' time ({use['encoders']} encoder(s))"
    if use.get("mean_utilization") is not None:
        line += f", utilisation {use['mean_utilization']:.0f}%"
    if use.get("peak_memory_gib") is not None:
        line += f", peak memory {use['peak_memory_gib']:.1f} GiB"
    if use.get("oom_splits"):
        line += f", {use['oom_splits']} batch(es) split after running out of device memory"
    return line
