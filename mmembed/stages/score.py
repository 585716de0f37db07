"""Stage 3 of the rerank job: the CrossEncoder forward pass and score head, on GPU actors.

It is the embedding job's ModelStage with another head: rows are grouped by feature
signature, length-sorted and batched the same way, a failing batch is split until only the
offending pair becomes an error row, and transfers overlap compute. What runs on the device is
what `CrossEncoder.predict` runs per batch: the model (sequence classification or `LogitScore`),
an upcast of sub-fp32 scores, the model's activation and the single-label squeeze.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from mmembed.models.loading import ModelSpec
from mmembed.stages.encode import ModelStage
from mmembed.stages.read_pairs import split_pair_id

SCORE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("query_id", pa.string()),
        ("doc_id", pa.string()),
        ("score", pa.float32()),
        ("stage", pa.string()),
        ("error", pa.string()),
    ]
)


class ScoreStage(ModelStage):
    """GPU (or CPU) actor: pair feature rows in, (query_id, doc_id, score) rows out."""

    def __init__(
        self,
        model: ModelSpec,
        *,
        device: str = "auto",
        batch_size: int = 32,
        max_batch_tokens: int | None = None,
        max_batch_patches: int | None = None,
        copy_mode: str = "staged",
    ):
        super().__init__(model, device=device, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                         max_batch_patches=max_batch_patches, copy_mode=copy_mode)
        if self.model.num_labels != 1:
            raise ValueError(f"{model.name_or_path} has {self.model.num_labels} labels; ranking needs one score")
        self._set_padding(getattr(self.model[0], "processor", None) or getattr(self.model, "tokenizer", None))

    def embed(self, features: dict):
        """CrossEncoder._inference's per-batch work; the scores stay on the device."""
        torch = self.torch
        with torch.inference_mode(), self.device_use.forward():
            scores = self.model(dict(features), **self.forward_kwargs)["scores"]
            if torch.is_floating_point(scores) and torch.finfo(scores.dtype).bits < 32:
                scores = scores.float()
            if self.model.activation_fn is not None:
                scores = self.model.activation_fn(scores)
            if scores.ndim > 1:
                scores = scores.squeeze(-1)
            return scores

    def _output(self, rows, scores, errors) -> pa.Table:
        values = np.zeros(len(rows), dtype=np.float32)
        valid = np.zeros(len(rows), dtype=bool)
        stage, error = [], []
        for i, row in enumerate(rows):
            if i in scores:
                values[i] = scores[i]
                valid[i] = True
            reason = errors.get(i) if i not in scores else None
            stage.append(None if i in scores else ("score" if reason else row["stage"]))
            error.append(None if i in scores else (reason or row["error"]))
        ids = [split_pair_id(r["id"]) for r in rows]
        return pa.table(
            {
                "id": [r["id"] for r in rows],
                "query_id": [q for q, _ in ids],
                "doc_id": [d for _, d in ids],
                "score": pa.array(values, mask=~valid),
                "stage": stage,
                "error": error,
            },
            schema=SCORE_SCHEMA,
        )
