"""How the benchmarks read a rate and the machine it ran on: rows per second while an embed job's
shards stream out (`steady_rate`), the GPU's utilisation sampled through NVML (`GpuSampler`), the
CPUs this process may use and the library versions (`usable_cpus`, `environment`), a fresh process's
wall time (`fresh_process_s`)."""

from __future__ import annotations

import os
import platform
import time


# ---------------------------------------------------------------------------------------------
# Reading an embed job's output
# ---------------------------------------------------------------------------------------------
def steady_rate(out_dir: str, files: list[dict], wall_s: float) -> float | None:
    """Rows per second while shards stream out, from their modification times.

    Shards are renamed into place as they complete; the first 10% of rows (pipeline fill) are
    left out so the figure is the sustained rate a corpus-scale run sees. None when the shards
    did not stream (a corpus small enough to come out in one burst says nothing about a rate).
    """
    stamps = sorted((os.stat(os.path.join(out_dir, f["name"])).st_mtime, f["rows"]) for f in files)
    if len(stamps) < 4:
        return None
    total = sum(r for _, r in stamps)
    cum, k = 0, 0
    for k, (_, rows) in enumerate(stamps):
        cum += rows
        if cum >= 0.1 * total:
            break
    span = stamps[-1][0] - stamps[k][0]
    if span < 0.2 * wall_s:
        return None
    return (total - cum) / span


# ---------------------------------------------------------------------------------------------
# End to end, on Ray
# ---------------------------------------------------------------------------------------------
class GpuSampler:
    """Samples the GPU's utilisation and memory through NVML (nvidia-ml-py) every `period` seconds
    while it is open; on a machine without NVML it records nothing and says why."""

    def __init__(self, period: float = 0.1):
        import threading

        self.period, self.samples, self.why = period, [], None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception as exc:  # noqa: BLE001 - no NVML: the figure is absent, not the run
            self.why = f"{type(exc).__name__}: {exc}"
            return
        while not self._stop.is_set():
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            self.samples.append((time.perf_counter(), util.gpu, mem.used))
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self, start: float | None = None) -> dict:
        """Mean utilisation over all samples and over those after `start` (the steady part)."""
        if not self.samples:
            return {"samples": 0, "why": self.why}
        util = [u for _, u, _ in self.samples]
        after = [u for t, u, _ in self.samples if start is not None and t >= start]
        return {
            "samples": len(util),
            "mean_util": sum(util) / len(util),
            "steady_mean_util": sum(after) / len(after) if after else None,
            "peak_mem_gib": max(m for _, _, m in self.samples) / 2**30,
        }


def environment(device: str) -> dict:
    import sentence_transformers
    import torch
    import transformers

    card = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = None
    return {
        "card": card,
        "cpus": usable_cpus(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "ray": ray_version,
    }


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def fresh_process_s(argv: list[str]) -> float:
    """Wall time of a new Python process running argv (a command's cold start), which must succeed."""
    return fresh_process_peak(argv)[0]


def fresh_process_peak(argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak resident bytes) of a new Python process running argv, which must succeed."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": root}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    proc.stdout.close()
    # wait4 on this child alone: its own peak RSS, not the largest of every child so far.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{argv} failed (rc {proc.returncode}):\n{out.decode(errors='replace')[-3000:]}")
    return wall, usage.ru_maxrss * 1024
