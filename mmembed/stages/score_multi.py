"""Stage 3 of the rerank job for multi-vector models: MaxSim between each pair's two sides.

What `model.similarity_pairwise(model.encode_query(queries), model.encode_document(docs))` computes, per
batch of pairs: each side's forward pass with its task, its scored vectors cut out by the model's mask, and
the model's own pairwise similarity (MaxSim, or MeanMaxSim where the model says so). Batching, device
copies and error isolation are the encoder's (ModelStage); the output rows are the cross-encoder's.
"""

from __future__ import annotations

import json

from mmembed.models.loading import ModelSpec
from mmembed.stages.encode import ModelStage
from mmembed.stages.pair_preprocess_multi import SIDE_TASKS
from mmembed.stages.score import ScoreStage


def side_rows(rows: list[dict], side: str) -> list[dict]:
    """The feature rows of one side of each pair, with their keys unprefixed."""
    mark = f"{side}:"
    out = []
    for row in rows:
        keep = [j for j, key in enumerate(row["feat_keys"]) if key.startswith(mark)]
        meta = {k[len(mark):]: v for k, v in json.loads(row["feat_meta"]).items() if k.startswith(mark)}
        out.append({
            "feat_keys": [row["feat_keys"][j][len(mark):] for j in keep],
            "feat_dtypes": [row["feat_dtypes"][j] for j in keep],
            "feat_shapes": [row["feat_shapes"][j] for j in keep],
            "feat_data": [row["feat_data"][j] for j in keep],
            "feat_meta": json.dumps(meta, sort_keys=True),
        })
    return out


class MultiVectorScoreStage(ScoreStage):
    """GPU (or CPU) actor: pair feature rows (both sides) in, (query_id, doc_id, MaxSim score) rows out."""

    def __init__(self, model: ModelSpec, *, device: str = "auto", batch_size: int = 32,
                 max_batch_tokens: int | None = None, max_batch_patches: int | None = None, copy_mode: str = "staged"):
        ModelStage.__init__(self, model, device=device, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                            max_batch_patches=max_batch_patches, copy_mode=copy_mode)
        self._set_padding(getattr(self.model, "tokenizer", None))

    def features(self, rows: list[dict]) -> dict:
        return {side: super(MultiVectorScoreStage, self).features(side_rows(rows, side)) for side in SIDE_TASKS}

    def embed(self, features: dict):
        torch = self.torch
        vectors = {}
        with torch.inference_mode(), self.device_use.forward():
            for side, task in SIDE_TASKS.items():
                out = self.model(dict(features[side]), task=task)
                vectors[side] = [e[m] for e, m in zip(out["token_embeddings"], out["attention_mask"].bool())]
            return self.model.similarity_pairwise(vectors["query"], vectors["doc"]).float()
