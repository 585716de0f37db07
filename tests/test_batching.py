"""Token-budget batching in the encode stage: batch plans, padding waste, and parity with ST."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest

from mmembed.models.batching import Budget, padding_waste, plan_batches, row_cost


def _check_partition(batches, n):
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(n)), "every row in exactly one batch"


def test_without_budget_it_is_st_length_sorted_chunks():
    costs = [(5, 0), (9, 0), (3, 0), (9, 0), (1, 0)]
    batches = plan_batches(costs, Budget(max_rows=2))
    # longest first; ties keep arrival order, like ST's stable sort
    assert batches == [[1, 3], [0, 2], [4]]


def test_token_budget_bounds_padded_size_and_keeps_every_row():
    rng = random.Random(0)
    costs = [(rng.randint(20, 400), 0) for _ in range(200)]
    budget = Budget(max_rows=64, max_tokens=4096)
    batches = plan_batches(costs, budget)
    _check_partition(batches, len(costs))
    for b in batches:
        longest = max(costs[i][0] for i in b)
        assert len(b) <= 64
        assert len(b) * longest <= 4096
    # short rows pack many to a batch, long rows few
    sizes = {max(costs[i][0] for i in b): len(b) for b in batches}
    assert sizes[min(sizes)] > sizes[max(sizes)]


def test_a_row_over_the_budget_gets_its_own_batch():
    costs = [(10, 0), (5000, 0), (10, 0)]
    batches = plan_batches(costs, Budget(max_rows=8, max_tokens=1000))
    assert [1] in batches
    _check_partition(batches, 3)


def test_patch_budget():
    costs = [(300, 1200), (300, 1200), (300, 1200), (100, 100)]
    batches = plan_batches(costs, Budget(max_rows=32, max_patches=2500))
    _check_partition(batches, 4)
    for b in batches:
        assert sum(costs[i][1] for i in b) <= 2500 or len(b) == 1


def test_padding_waste_is_exact_and_sorting_lowers_it():
    costs = [(10, 0), (2, 0), (10, 0), (2, 0)]
    arrival = [[0, 1], [2, 3]]
    assert padding_waste(costs, arrival) == pytest.approx(1 - 24 / 40)
    sorted_plan = plan_batches(costs, Budget(max_rows=2))
    assert padding_waste(costs, sorted_plan) == 0.0
    assert padding_waste([], []) == 0.0


def _png(w, h, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _records(items):
    import pyarrow as pa

    from mmembed.inputs.discover import RECORD_SCHEMA

    n = len(items)
    cols = {f.name: pa.nulls(n, f.type) for f in RECORD_SCHEMA}
    cols["id"] = pa.array([f"r{i}" for i in range(n)], pa.string())
    cols["image_bytes"] = pa.array([v if isinstance(v, bytes) else None for v in items], pa.binary())
    cols["text"] = pa.array([v if isinstance(v, str) else None for v in items], pa.string())
    return pa.table(cols, schema=RECORD_SCHEMA)


def test_encode_stage_token_budget_matches_st(tiny_qwen3vl):
    """Mixed-size images and texts under a tight token budget: same embeddings as ST, less padding."""
    from PIL import Image
    from sentence_transformers import SentenceTransformer

    from mmembed.models.loading import ModelSpec
    from mmembed.stages.encode import EncodeStage
    from mmembed.stages.preprocess import PreprocessStage

    sizes = [(128, 32), (32, 128), (96, 96), (128, 128), (40, 40), (64, 128)]
    images = [_png(w, h, i) for i, (w, h) in enumerate(sizes)]
    texts = ["a cat", "a dog running in a big green park near the river", "red car", "the sea"]
    spec = ModelSpec(tiny_qwen3vl)
    pre = PreprocessStage(spec)
    table = pre(_records(images + texts))
    assert table.column("error").null_count == table.num_rows

    rows = table.to_pylist()
    costs = [row_cost(r) for r in rows]
    assert all(c[1] > 0 for c in costs[: len(images)]), "image rows count their vision patches"
    assert all(c[1] == 0 for c in costs[len(images) :])
    assert len({c[1] for c in costs[: len(images)]}) > 1, "sizes give different patch counts"
    for c, r in zip(costs, rows):
        assert c[0] == r["feat_shapes"][r["feat_keys"].index("attention_mask")][-1]

    longest = max(c[0] for c in costs)
    plain = EncodeStage(spec, device="cpu", batch_size=8)
    budgeted = EncodeStage(spec, device="cpu", batch_size=8, max_batch_tokens=2 * longest)
    out_plain = plain(table)
    out_budget = budgeted(table)
    assert budgeted.padding_waste < plain.padding_waste

    st = SentenceTransformer(tiny_qwen3vl, device="cpu")
    inputs = [Image.open(io.BytesIO(b)).convert("RGB") for b in images] + texts
    ref = np.stack([st.encode([x], convert_to_numpy=True)[0] for x in inputs])
    for out in (out_plain, out_budget):
        assert out.column("error").null_count == out.num_rows
        emb = np.asarray(out.column("embedding").to_pylist(), dtype=np.float32)
        assert np.abs(emb - ref).max() <= 1e-5
