"""Stage 3, encode: the model's forward pass, pooling and normalisation on a GPU actor pool.

The same class runs on CPU actors when no GPU is present. It loads the model once per actor,
re-collates the preprocessed rows it receives into batches of one signature, and does what
ST's `encode` does after `preprocess`: forward, optional truncation and normalisation.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import pyarrow as pa

from mmembed.features import collate, signature
from mmembed.models import ModelSpec, load_model, resolve_device

log = logging.getLogger(__name__)


def embedding_schema(dim: int, precision: str = "float32") -> pa.Schema:
    value_type = pa.float16() if precision == "float16" else pa.float32()
    return pa.schema(
        [
            ("id", pa.string()),
            ("modality", pa.string()),
            ("embedding", pa.list_(value_type, dim)),
            ("stage", pa.string()),
            ("error", pa.string()),
        ]
    )


def _seq_len(row: dict) -> int:
    for key in ("attention_mask", "input_ids"):
        if key in row["feat_keys"]:
            shape = row["feat_shapes"][row["feat_keys"].index(key)]
            return int(shape[-1])
    return 0


class EncodeStage:
    """GPU (or CPU) actor: feature rows in, embedding rows out; error rows pass through."""

    def __init__(
        self,
        model: ModelSpec,
        *,
        device: str = "auto",
        batch_size: int = 32,
        task: str | None = None,
        normalize: bool = False,
        truncate_dim: int | None = None,
        precision: str = "float32",
    ):
        import torch

        self.torch = torch
        self.device = resolve_device(device)
        self.model = load_model(model, weights=True, device=self.device)
        self.model.eval()
        self.batch_size = batch_size
        self.forward_kwargs = {"task": task} if task else {}
        self.normalize = normalize
        self.truncate_dim = truncate_dim if truncate_dim is not None else getattr(self.model, "truncate_dim", None)
        self.precision = precision
        tokenizer = getattr(self.model, "tokenizer", None)
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap their tokenizer
        self.pad_token_id = getattr(tokenizer, "pad_token_id", None) or 0
        self.padding_side = getattr(tokenizer, "padding_side", "right") or "right"
        dim = self.model.get_embedding_dimension()
        self.dim = min(dim, self.truncate_dim) if self.truncate_dim else dim
        self.schema = embedding_schema(self.dim, precision)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        embeddings: dict[int, np.ndarray] = {}
        errors: dict[int, str] = {}
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            if row["error"] is None:
                groups[signature(row)].append(i)
        for idxs in groups.values():
            # Length-sorted chunks waste less compute on padding, as in ST's encode.
            idxs.sort(key=lambda i: _seq_len(rows[i]), reverse=True)
            for start in range(0, len(idxs), self.batch_size):
                self._encode_chunk(rows, idxs[start : start + self.batch_size], embeddings, errors)
        return self._output(rows, embeddings, errors)

    def _encode_chunk(self, rows, idxs, embeddings, errors):
        try:
            vectors = self.forward([rows[i] for i in idxs])
        except Exception as exc:  # noqa: BLE001 - isolate the offending record below
            if len(idxs) == 1:
                errors[idxs[0]] = f"encode failed: {type(exc).__name__}: {exc}"
                return
            for i in idxs:
                self._encode_chunk(rows, [i], embeddings, errors)
            return
        for i, v in zip(idxs, vectors):
            embeddings[i] = v

    def forward(self, rows: list[dict]) -> np.ndarray:
        """Collate rows of one signature and run ST's forward, pooling and normalisation."""
        from sentence_transformers.util import batch_to_device

        torch = self.torch
        features = collate(rows, pad_token_id=self.pad_token_id, padding_side=self.padding_side)
        with torch.inference_mode():
            features = batch_to_device(features, self.model.device)
            out = self.model(features, **self.forward_kwargs)
            emb = out["sentence_embedding"]
            if self.truncate_dim:
                emb = emb[..., : self.truncate_dim]
            if self.normalize:
                emb = torch.nn.functional.normalize(emb, p=2, dim=1)
            return emb.float().cpu().numpy()

    def _output(self, rows, embeddings, errors) -> pa.Table:
        n = len(rows)
        dtype = np.float16 if self.precision == "float16" else np.float32
        flat = np.zeros((n, self.dim), dtype=dtype)
        valid = np.zeros(n, dtype=bool)
        stage, error = [], []
        for i, row in enumerate(rows):
            if i in embeddings:
                flat[i] = embeddings[i]
                valid[i] = True
                stage.append(None)
                error.append(None)
            elif i in errors:
                stage.append("encode")
                error.append(errors[i])
            else:
                stage.append(row["stage"])
                error.append(row["error"])
        values = pa.array(flat.reshape(-1))
        emb = pa.FixedSizeListArray.from_arrays(values, self.dim, mask=pa.array(~valid))
        return pa.table(
            {
                "id": pa.array([r["id"] for r in rows], pa.string()),
                "modality": pa.array([r["modality"] for r in rows], pa.string()),
                "embedding": emb,
                "stage": pa.array(stage, pa.string()),
                "error": pa.array(error, pa.string()),
            },
            schema=self.schema,
        )
