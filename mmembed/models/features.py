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


def pack(features: dict[str, Any], transport_dtype: str | None = None, uint8_pixels: bool = False) -> dict[str, Any]:
    """One record's preprocessed features as Arrow-ready cells; with `uint8_pixels`, pixel_values are the
    processor's pixels before its rescale and normalise (mmembed/models/pixel_tail.py)."""
    import torch

    keys, dtypes, shapes, data, meta = [], [], [], [], {}
    for key, value in features.items():
        if isinstance(value, torch.Tensor):
            if uint8_pixels and key == "pixel_values":
                from mmembed.models.pixel_tail import as_uint8

                value = as_uint8(value)
            elif transport_dtype and value.is_floating_point() and key in ("pixel_values", "pixel_values_videos"):
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
    must have one entry per record on their first axis, except Qwen-VL's patch rows, which a record's
    image_grid_thw (t x h x w patches) tells apart. Anything else that concatenates records fails
    and is processed one record at a time instead.
    """
    import torch

    mask = features.get("attention_mask")
    expansion = features.get("query_expansion_positions")
    if isinstance(mask, torch.Tensor) and isinstance(expansion, torch.Tensor) and expansion.shape == mask.shape:
        # A ColBERT query's expansion tokens are scored whether or not the encoder attends to them:
        # they are part of the record, not padding.
        mask = mask.bool() | expansion.bool()
    patches = _patch_rows(features, n)
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, value in features.items():
        if not isinstance(value, torch.Tensor):
            for row in rows:
                row[key] = value
            continue
        if key in patches:
            for row, part in zip(rows, patches[key]):
                row[key] = part
            continue
        if value.ndim == 0 or value.shape[0] != n:
            return None
        token_aligned = isinstance(mask, torch.Tensor) and value.ndim == 2 and value.shape == mask.shape
        for i, row in enumerate(rows):
            row[key] = value[i][mask[i].bool()].unsqueeze(0) if token_aligned else value[i : i + 1]
    return rows


def _patch_rows(features: dict[str, Any], n: int) -> dict[str, tuple]:
    """{pixel key: one slice of its rows per record} for Qwen-VL-style patch tensors, whose records'
    rows are concatenated and counted by their grid (image_grid_thw / video_grid_thw: t x h x w)."""
    import torch

    out = {}
    for key, grid_key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        value, grid = features.get(key), features.get(grid_key)
        if isinstance(value, torch.Tensor) and isinstance(grid, torch.Tensor) and grid.ndim == 2 and len(grid) == n:
            counts = grid.prod(dim=1).tolist()
            if sum(counts) == value.shape[0]:
                out[key] = torch.split(value, counts)
            elif value.ndim == 3 and value.shape[0] == n and max(counts) <= value.shape[1]:
                # ColQwen2's processor pads each record's rows to the batch's longest: keep a record's own
                # rows (its forward unpads by the grid, and collate pads again).
                out[key] = tuple(value[i : i + 1, :c] for i, c in enumerate(counts))
    return out


def same_features(a: dict[str, Any], b: dict[str, Any], exact: bool = False) -> bool:
    """The same keys, shapes, dtypes and values; float tensors within 1e-6, or bit for bit with `exact`."""
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
            if x.is_floating_point() and not exact:
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


def feature_rows(table: pa.Table) -> list[dict]:
    """The rows of a preprocessed table as dicts, each `feat_data` cell a list of zero-copy
    uint8 views into the table's Arrow buffer.

    `Table.to_pylist` would copy every tensor into a Python bytes object first; at GPU rates
    (gigabytes of pixels a second) each copy on the encoder's host thread costs throughput.
    """
    rows = table.drop_columns(["feat_data"]).to_pylist()
    r = 0
    for chunk in table.column("feat_data").chunks:
        offsets = chunk.offsets.to_numpy()
        values = chunk.values
        _, value_offsets, data = values.buffers()
        ends = np.frombuffer(value_offsets, dtype=np.int64)[values.offset : values.offset + len(values) + 1]
        flat = np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, np.uint8)
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        for i in range(len(chunk)):
            if valid[i]:
                lo, hi = offsets[i], offsets[i + 1]
                rows[r]["feat_data"] = [flat[ends[j] : ends[j + 1]] for j in range(lo, hi)]
            else:
                rows[r]["feat_data"] = []
            r += 1
    return rows


def _view(dtype: str, shape: list[int], data) -> np.ndarray:
    """A tensor's bytes as a numpy array, without a copy (bfloat16 as its int16 bit pattern)."""
    np_dtype = np.int16 if dtype == "bfloat16" else np.dtype(dtype)
    return np.frombuffer(data, dtype=np_dtype).reshape(shape)


def _to_torch(arr: np.ndarray, dtype: str):
    """A freshly built (writable) numpy array as a tensor, sharing its memory."""
    import torch

    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def signature(row: dict) -> tuple:
    """Rows with the same signature can share one forward pass."""
    return (row["feat_meta"], tuple(row["feat_keys"]))


def collate(rows: list[dict], *, pad_token_id: int = 0, padding_side: str = "right") -> dict[str, Any]:
    """Collate rows of one signature into the dict ST's forward expects.

    Each tensor of the batch is built with one copy out of the rows' buffers: sequences are
    padded into a preallocated array, everything else is concatenated on the first axis.
    """
    meta = {k: _from_json(v) for k, v in json.loads(rows[0]["feat_meta"]).items()}
    keys = rows[0]["feat_keys"]
    per_key: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    dtypes: dict[str, str] = {}
    for row in rows:
        for k, dt, shp, buf in zip(row["feat_keys"], row["feat_dtypes"], row["feat_shapes"], row["feat_data"]):
            per_key[k].append(_view(dt, shp, buf))
            dtypes[k] = dt

    seq_len_key = "attention_mask" if "attention_mask" in per_key else ("input_ids" if "input_ids" in per_key else None)
    out: dict[str, Any] = {}
    for k, arrays in per_key.items():
        is_seq = (
            seq_len_key is not None
            and all(a.ndim == 2 and a.shape[0] == 1 for a in arrays)
            and all(a.shape[1] == ref.shape[1] for a, ref in zip(arrays, per_key[seq_len_key]))
        )
        if is_seq:
            pad_value = pad_token_id if k == "input_ids" else SEQUENCE_PAD_VALUES.get(k, 0)
            out[k] = _to_torch(_pad_sequences(arrays, pad_value, padding_side), dtypes[k])
        else:
            out[k] = _to_torch(_concat_first_axis(arrays), dtypes[k])
    out.update(meta)
    return out


def _pad_sequences(arrays: list[np.ndarray], pad_value, side: str) -> np.ndarray:
    longest = max(a.shape[1] for a in arrays)
    out = np.full((len(arrays), longest), pad_value, dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        n = a.shape[1]
        if side == "left":
            out[i, longest - n :] = a[0]
        else:
            out[i, :n] = a[0]
    return out


def _concat_first_axis(arrays: list[np.ndarray]) -> np.ndarray:
    if any(a.ndim == 0 for a in arrays):
        return np.stack(arrays)
    trailing = {a.shape[1:] for a in arrays}
    if len(trailing) == 1:
        return np.concatenate(arrays, axis=0)
    # Processors pad variable-length tensors (audio features) to the batch's longest on the
    # last axes; do the same with zeros, which is what feature extractors pad with.
    target = tuple(max(s[i] for s in trailing) for i in range(len(next(iter(trailing)))))
    out = np.zeros((sum(a.shape[0] for a in arrays), *target), dtype=arrays[0].dtype)
    row = 0
    for a in arrays:
        out[(slice(row, row + a.shape[0]), *(slice(0, n) for n in a.shape[1:]))] = a
        row += a.shape[0]
    return out
