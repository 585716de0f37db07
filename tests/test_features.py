"""Processor tensors through Arrow and back: what the encoder collates is what was packed."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from mmembed.models.features import FEATURE_FIELDS, collate, feature_rows, pack

SCHEMA = pa.schema([("id", pa.string()), *FEATURE_FIELDS])


def _table(records: list[dict], start: int) -> pa.Table:
    cols = {"id": [f"r{start + i}" for i in range(len(records))]}
    packed = [pack(r) for r in records]
    for name, _ in FEATURE_FIELDS:
        cols[name] = [p[name] for p in packed]
    return pa.table(cols, schema=SCHEMA)


def _text(rng, n: int) -> dict:
    ids = torch.from_numpy(rng.integers(5, 100, size=(1, n)))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_feature_rows_are_the_packed_bytes_across_chunks_slices_and_empty_rows():
    rng = np.random.default_rng(0)
    images = [{"pixel_values": torch.from_numpy(rng.random((1, 3, 4, 4), dtype=np.float32))} for _ in range(5)]
    texts = [_text(rng, n) for n in (3, 7, 1, 4)]
    table = pa.concat_tables([_table(images, 0), _table(texts, 5), _table([{}], 9)]).slice(2, 7)
    assert table.column("feat_data").num_chunks > 1
    want = table.to_pylist()
    got = feature_rows(table)
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for g, w in zip(got, want):
        assert [bytes(v) for v in g["feat_data"]] == w["feat_data"]
        assert {k: v for k, v in g.items() if k != "feat_data"} == {k: v for k, v in w.items() if k != "feat_data"}


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_sequences_like_a_tokenizer_and_concatenates_the_rest(side):
    rng = np.random.default_rng(1)
    texts = [_text(rng, n) for n in (3, 7, 1)]
    rows = feature_rows(_table(texts, 0))
    batch = collate(rows, pad_token_id=0, padding_side=side)
    for i, t in enumerate(texts):
        n = t["input_ids"].shape[1]
        cut = slice(None, n) if side == "right" else slice(7 - n, None)
        assert torch.equal(batch["input_ids"][i, cut], t["input_ids"][0])
        assert int(batch["attention_mask"][i].sum()) == n
    assert batch["input_ids"].shape == (3, 7) and batch["input_ids"].dtype == torch.int64

    pixels = [torch.randn(2, 5, dtype=torch.bfloat16), torch.randn(3, 5, dtype=torch.bfloat16)]
    grids = [torch.tensor([[1, 1, 2]]), torch.tensor([[1, 1, 3]])]
    rows = feature_rows(_table([{"pixel_values": p, "image_grid_thw": g} for p, g in zip(pixels, grids)], 0))
    batch = collate(rows)
    assert torch.equal(batch["pixel_values"], torch.cat(pixels)) and batch["pixel_values"].dtype == torch.bfloat16
    assert torch.equal(batch["image_grid_thw"], torch.cat(grids))


def test_collate_zero_pads_unequal_trailing_axes_as_feature_extractors_do():
    short, long = torch.randn(1, 4, 6), torch.randn(1, 4, 9)
    batch = collate(feature_rows(_table([{"input_features": short}, {"input_features": long}], 0)))
    assert batch["input_features"].shape == (2, 4, 9)
    assert torch.equal(batch["input_features"][0, :, :6], short[0]) and not batch["input_features"][0, :, 6:].any()
    assert torch.equal(batch["input_features"][1], long[0])
    batch["input_features"] += 1  # writable memory of its own, not a view of the Arrow buffer


def test_collate_benchmark_runs_and_agrees_with_its_baseline(monkeypatch, capsys):
    import benchmarks.collate_cpu as bench

    monkeypatch.setattr("sys.argv", ["collate_cpu.py", "--rows", "8", "--repeat", "1"])
    assert bench.main() == 0  # it asserts equal tensors from both routes before timing them
    out = capsys.readouterr().out
    assert out.count("ratio mmembed / user's route") == 2 and out.count("ratio mmembed / plain route") == 2


def test_a_batched_qwen_vl_call_splits_into_each_records_own_features(tiny_qwen3vl):
    """Qwen-VL concatenates the patch rows of a batch; each record's rows, counted by its image_grid_thw,
    and its unpadded tokens are what a call for that record alone returns, so screenshots are processed
    a batch per processor call."""
    from mmembed.models.features import same_features, split_batch
    from mmembed.models.loading import ModelSpec, load_model
    from tests.helpers import make_image

    model = load_model(ModelSpec(tiny_qwen3vl), weights=False)
    images = [make_image(i, size) for i, size in enumerate([(56, 56), (112, 84), (140, 56), (84, 168)])]
    batched = model.preprocess(images)
    assert batched["pixel_values"].shape[0] == int(batched["image_grid_thw"].prod(dim=1).sum())
    parts = split_batch(batched, len(images))
    assert parts is not None
    for image, part in zip(images, parts):
        assert same_features(part, model.preprocess([image]))
