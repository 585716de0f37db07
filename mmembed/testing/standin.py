"""Stand-in encoders that let a CPU-only machine say whether the CPU stages would keep a GPU busy.

- `RateLimitedEncoder` does the encoder's real host work (Arrow rows to collated tensors, the
  copy to the run's device) and then behaves like an accelerator of forward rate `rate`
  records/s: each batch occupies a virtual device for `rows / rate` seconds. Like CUDA, the
  device runs asynchronously: the host collates the next batch while the previous one "runs",
  and each call waits once, at the end, for the device to drain (as `EncodeStage` does when it
  copies the embeddings back).
- `NullEncoder` does nothing at all, so a pipeline built with it runs at the rate of its CPU
  stages (read, fetch, decode, preprocess, write).

Both emit `EncodeStage`'s output schema (zero vectors), so the writer and the run accounting
are the real ones.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa

from mmembed.stages.encode import EncodeStage, embedding_schema


class RateLimitedEncoder(EncodeStage):
    """`EncodeStage` with the forward pass replaced by a virtual device of `rate` records/s."""

    def __init__(self, model, *, rate: float, **kwargs):
        super().__init__(model, **kwargs)
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self._busy_until = 0.0
        self._clock = threading.Lock()  # actors with max_concurrency > 1 share the device

    def _encode_chunk(self, rows, idxs, pending, errors):
        self.to_device(self.collate([rows[i] for i in idxs]))  # the real host work
        with self._clock:
            now = time.perf_counter()
            self._busy_until = max(now, self._busy_until) + len(idxs) / self.rate
        pending.append((idxs, self.torch.zeros((len(idxs), self.dim))))

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = super().__call__(batch)
        wait = self._busy_until - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return out


class SlowDeviceEncoder(EncodeStage):
    """`EncodeStage` whose every forward pass takes `delay` seconds more, as a busy GPU would:
    long enough for calls to pile up, so tests can see whether an actor runs them at once."""

    def __init__(self, model, *, delay: float, **kwargs):
        super().__init__(model, **kwargs)
        self.delay = float(delay)

    def embed(self, features: dict):
        time.sleep(self.delay)
        return super().embed(features)


class NullEncoder:
    """No host work and no device: embedding rows (zeros) for every feature row, errors passed on."""

    def __init__(self, model=None, *, dim: int, **_ignored):
        self.dim = dim
        self.schema = embedding_schema(dim)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        valid = batch.column("error").is_null().to_numpy(zero_copy_only=False)
        values = pa.array(np.zeros(n * self.dim, dtype=np.float32))
        emb = pa.FixedSizeListArray.from_arrays(values, self.dim, mask=pa.array(~valid))
        return pa.table(
            {
                "id": batch.column("id"),
                "modality": batch.column("modality"),
                "embedding": emb,
                "stage": batch.column("stage"),
                "error": batch.column("error"),
            },
            schema=self.schema,
        )
