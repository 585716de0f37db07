"""Processor outputs as Arrow rows, and back into model batches.

The preprocess pool turns each record into ST's features (`model.preprocess([record])`).
Those tensors travel between actors as plain Arrow columns (raw little-endian bytes plus
dtype and shape), never as pickled objects, so Ray can size and spill blocks exactly and
re-batch rows freely. The encode pool re-collates any set of rows: sequence tensors are
padded on the tokenizer's padding side, everything else is concatenated on the first axis
(VLM patch tensors and grids included), which is what the processor itself does for a batch.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

FEATURE_FIELDS = [
    ("feat_keys", pa.list_(pa.string())),
    ("feat_dtypes", pa.list_(pa.string())),
    ("feat_shapes", pa.list_(pa.list_(pa.int64()))),
    ("feat_data", pa.list_(pa.large_binary())),
    ("feat_meta", pa.string()),
]

# Keys whose values are token-aligned: [1, seq_len] for one record.
SEQUENCE_PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0, "position_ids": 0}


def _to_numpy(t) -> tuple[np.ndarray, str]:
    import torch

    if t.dtype == torch.bfloat16:
        # numpy has no bfloat16: ship the raw 16-bit pattern and restore it on the other side.
        return t.contiguous().view(torch.int16).numpy(), "bfloat16"
    arr = t.contiguous().numpy()
    return arr, str(arr.dtype)


def pack(features: dict[str, Any], transport_dtype: str | None = None) -> dict[str, Any]:
    """One record's preprocessed features as Arrow-ready cells."""
    import torch

    keys, dtypes, shapes, data, meta = [], [], [], [], {}
    for key, value in features.items():
        if isinstance(value, torch.Tensor):
            if transport_dtype and value.is_floating_point() and key in ("pixel_values", "pixel_values_videos"):
                value = value.to(getattr(torch, transport_dtype))
            arr, dtype = _to_numpy(value.detach().cpu())
            keys.append(key)
            dtypes.append(dtype)
            shapes.append(list(arr.shape))
            data.append(arr.tobytes())
        else:
            meta[key] = _jsonable(value)
    return {
        "feat_keys": keys,
        "feat_dtypes": dtypes,
        "feat_shapes": shapes,
        "feat_data": data,
        "feat_meta": json.dumps(meta, sort_keys=True),
    }


def split_batch(features: dict[str, Any], n: int) -> list[dict[str, Any]] | None:
    """Per-record features from one batched processor call, or None when they cannot be told apart.

    Token-aligned tensors lose their padding (the attention mask says where it is); other tensors
    must have one entry per record on their first axis. Processors that concatenate records
    (VLM patch tensors) fail that test and are processed one record at a time instead.
    """
    import torch

    mask = features.get("attention_mask")
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, value in features.items():
        if not isinstance(value, torch.Tensor):
            for row in rows:
                row[key] = value
            continue
        if value.ndim == 0 or value.shape[0] != n:
            return None
        token_aligned = isinstance(mask, torch.Tensor) and value.ndim == 2 and value.shape == mask.shape
        for i, row in enumerate(rows):
            row[key] = value[i][mask[i].bool()].unsqueeze(0) if token_aligned else value[i : i + 1]
    return rows


def same_features(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    if a.keys() != b.keys():
        return False
    for key, x in a.items():
        y = b[key]
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                return False
            if x.is_floating_point():
                if not torch.allclose(x, y, rtol=0, atol=1e-6):
                    return False
            elif not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def _jsonable(value):
    if isinstance(value, tuple):
        return {"__tuple__": [_jsonable(v) for v in value]}
    if isinstance(value, (list,)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _from_json(value):
    if isinstance(value, dict) and "__tuple__" in value:
        return tuple(_from_json(v) for v in value["__tuple__"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def unpack_tensor(dtype: str, shape: list[int], data: bytes):
    import torch

    if dtype == "bfloat16":
        arr = np.frombuffer(data, dtype=np.int16).reshape(shape)
        return torch.from_numpy(arr.copy()).view(torch.bfloat16)
    arr = np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)
    # frombuffer views are read-only; torch wants writable memory.
    return torch.from_numpy(arr.copy())


def signature(row: dict) -> tuple:
    """Rows with the same signature can share one forward pass."""
    return (row["feat_meta"], tuple(row["feat_keys"]))


def collate(rows: list[dict], *, pad_token_id: int = 0, padding_side: str = "right") -> dict[str, Any]:
    """Collate rows of one signature into the dict ST's forward expects."""
    meta = {k: _from_json(v) for k, v in json.loads(rows[0]["feat_meta"]).items()}
    keys = rows[0]["feat_keys"]
    per_key: dict[str, list] = {k: [] for k in keys}
    for row in rows:
        for k, dt, shp, buf in zip(row["feat_keys"], row["feat_dtypes"], row["feat_shapes"], row["feat_data"]):
            per_key[k].append(unpack_tensor(dt, shp, buf))

    seq_len_key = "attention_mask" if "attention_mask" in per_key else ("input_ids" if "input_ids" in per_key else None)
    out: dict[str, Any] = {}
    for k, tensors in per_key.items():
        is_seq = (
            seq_len_key is not None
            and all(t.ndim == 2 and t.shape[0] == 1 for t in tensors)
            and all(t.shape[1] == ref.shape[1] for t, ref in zip(tensors, per_key[seq_len_key]))
        )
        if is_seq:
            pad_value = pad_token_id if k == "input_ids" else SEQUENCE_PAD_VALUES.get(k, 0)
            out[k] = _pad_sequences(tensors, pad_value, padding_side)
        else:
            out[k] = _concat_first_axis(k, tensors)
    out.update(meta)
    return out


def _pad_sequences(tensors, pad_value, side):
    import torch

    longest = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        missing = longest - t.shape[1]
        if missing:
            fill = torch.full((1, missing), pad_value, dtype=t.dtype)
            t = torch.cat([fill, t], dim=1) if side == "left" else torch.cat([t, fill], dim=1)
        padded.append(t)
    return torch.cat(padded, dim=0)


def _concat_first_axis(key, tensors):
    import torch

    if any(t.ndim == 0 for t in tensors):
        return torch.stack(tensors)
    trailing = {tuple(t.shape[1:]) for t in tensors}
    if len(trailing) > 1:
        # Processors pad variable-length tensors (audio features) to the batch's longest on the
        # last axes; do the same with zeros, which is what feature extractors pad with.
        target = [max(s[i] for s in trailing) for i in range(len(next(iter(trailing))))]
        grown = []
        for t in tensors:
            pads = []
            for i in reversed(range(len(target))):
                pads += [0, target[i] - t.shape[i + 1]]
            grown.append(torch.nn.functional.pad(t, pads))
        tensors = grown
    return torch.cat(tensors, dim=0)
