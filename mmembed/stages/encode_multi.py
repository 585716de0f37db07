"""Stage 3, encode, for multi-vector (late-interaction) models: one vector per token or patch.

What ST 6's `MultiVectorEncoder.encode` does after `preprocess`: the forward pass with the task (query
or document: the model's masks depend on it), each record's vectors cut out by the scoring mask the
model's MultiVectorMask wrote (padding, skiplist tokens and masked positions never reach the output),
optional per-token normalisation, then optional token pooling. The batch loop, device copies, error
isolation and counters are the single-vector encoder's (ModelStage).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from mmembed.models.loading import ModelSpec
from mmembed.stages.encode import ModelStage

MULTI_VECTOR_PRECISIONS = ("float32", "float16")


def multi_vector_schema(dim: int, precision: str = "float32") -> pa.Schema:
    value = pa.float16() if precision == "float16" else pa.float32()
    return pa.schema([
        ("id", pa.string()),
        ("modality", pa.string()),
        ("embedding", pa.list_(pa.list_(value, dim))),
        ("stage", pa.string()),
        ("error", pa.string()),
    ])


def token_pooling(pool_factor: float | None, protected_tokens: int = 1):
    """ST's HierarchicalTokenPooling for documents, as `encode_document(token_pooling=...)` takes it."""
    if not pool_factor or pool_factor <= 1:
        return None
    from sentence_transformers.multi_vector_encoder.modules import HierarchicalTokenPooling

    return HierarchicalTokenPooling(pool_factor=pool_factor, num_protected_tokens=protected_tokens)


class MultiVectorEncodeStage(ModelStage):
    """GPU (or CPU) actor: feature rows in, rows of token vectors out; error rows pass through."""

    def __init__(self, model: ModelSpec, *, device: str = "auto", batch_size: int = 32, task: str | None = "document",
                 normalize: bool = False, precision: str = "float32", pool_factor: float | None = None,
                 protected_tokens: int = 1, max_batch_tokens: int | None = None,
                 max_batch_patches: int | None = None, compile: bool = False, passthrough: tuple[str, ...] = (),
                 copy_mode: str = "staged", pixel_frames: bool = False):
        super().__init__(model, device=device, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                         max_batch_patches=max_batch_patches, passthrough=passthrough, copy_mode=copy_mode,
                         pixel_frames=pixel_frames)
        if precision not in MULTI_VECTOR_PRECISIONS:
            raise ValueError(f"multi-vector precision {precision!r} is not one of {MULTI_VECTOR_PRECISIONS}")
        self.task = task
        self.normalize = normalize
        self.precision = precision
        self.pooling = token_pooling(pool_factor, protected_tokens)
        self._set_padding(getattr(self.model, "tokenizer", None))
        self.dim = self.model.get_embedding_dimension()
        self.schema = multi_vector_schema(self.dim, precision)
        if compile:
            self._compile()

    def embed(self, features: dict):
        """The forward pass and each record's scored vectors, still on the device (a list of [n_i, dim])."""
        torch = self.torch
        with torch.inference_mode(), self.device_use.forward():
            out = self.model(dict(features), task=self.task)
            masks = out["attention_mask"].bool()
            vectors = [emb[mask] for emb, mask in zip(out["token_embeddings"], masks)]
            if self.normalize:
                vectors = [torch.nn.functional.normalize(v, p=2, dim=-1) for v in vectors]
        if self.pooling is not None:
            vectors = self.pooling.pool(vectors, task=self.task)
        return vectors

    @staticmethod
    def _to_host(emb) -> list[np.ndarray]:
        return [v.float().cpu().numpy() for v in emb]

    def _output(self, rows, embeddings, errors) -> pa.Table:
        counts, parts, stage, error, valid = [], [], [], [], []
        for i, row in enumerate(rows):
            if i in embeddings:
                parts.append(embeddings[i])
                counts.append(len(embeddings[i]))
                stage.append(None)
                error.append(None)
                valid.append(True)
                continue
            counts.append(0)
            valid.append(False)
            stage.append("encode" if i in errors else row["stage"])
            error.append(errors[i] if i in errors else row["error"])
        flat = np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)
        flat = flat.astype(np.float16 if self.precision == "float16" else np.float32)
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), self.dim)
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        embedding = pa.ListArray.from_arrays(offsets, vectors, mask=pa.array(~np.asarray(valid, dtype=bool)))
        return pa.table({
            "id": pa.array([r["id"] for r in rows], pa.string()),
            "modality": pa.array([r["modality"] for r in rows], pa.string()),
            "embedding": embedding,
            "stage": pa.array(stage, pa.string()),
            "error": pa.array(error, pa.string()),
        }, schema=self.schema)
