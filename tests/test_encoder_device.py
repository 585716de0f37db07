"""The encoder's device path: out-of-memory splits, the device-use figures, the staged copies.

Out-of-device-memory is injected on CPU (the stage cannot tell an injected torch.OutOfMemoryError
from CUDA's). The CUDA-only tests run where a GPU is present (the benchmark machine); here they skip.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sentence_transformers import SentenceTransformer

from mmembed.models.device_use import STATS_COLUMN, DeviceUse, latest, summarise
from mmembed.models.loading import ModelSpec
from mmembed.stages.encode import EncodeStage
from mmembed.stages.preprocess import PreprocessStage
from tests.conftest import run_job
from tests.helpers import decoded, image_bytes, read_output

N = 12


@pytest.fixture(scope="module")
def clip_rows(tiny_clip):
    """Preprocessed rows for N photos, one of them flat grey (the 'poison' record below)."""
    import io

    from PIL import Image

    imgs = [image_bytes(i, size=(40 + 2 * i, 36)) for i in range(N - 1)]
    buf = io.BytesIO()
    Image.new("RGB", (40, 36), (128, 128, 128)).save(buf, "PNG")
    imgs.append(buf.getvalue())
    ids = [f"r{i:02d}" for i in range(N)]
    records = pa.table({"id": ids, "image": pa.array(imgs, pa.binary())})
    rows = PreprocessStage(ModelSpec(tiny_clip))(as_records(records))
    ref = SentenceTransformer(tiny_clip, device="cpu").encode([decoded(b) for b in imgs], batch_size=4)
    return ids, rows, ref


def as_records(table: pa.Table) -> pa.Table:
    from mmembed.inputs.discover import RECORD_SCHEMA

    columns = {f.name: pa.nulls(table.num_rows, f.type) for f in RECORD_SCHEMA}
    columns["id"] = table.column("id")
    columns["image_bytes"] = table.column("image")
    return pa.table(columns, schema=RECORD_SCHEMA)


def embedded(out: pa.Table) -> dict[str, np.ndarray]:
    return {
        r["id"]: np.asarray(r["embedding"], dtype=np.float32)
        for r in out.select(["id", "embedding", "error"]).to_pylist()
        if r["error"] is None
    }


def check_equal_st(found: dict, ids: list[str], ref: np.ndarray, skip=()):
    for i, id_ in enumerate(ids):
        if id_ in skip:
            continue
        assert np.abs(found[id_] - ref[i]).max() <= 1e-5, id_


def oom(rows: int):
    return torch.OutOfMemoryError(f"CUDA out of memory (injected at {rows} rows)")


def test_a_batch_out_of_memory_is_halved_until_it_fits(tiny_clip, clip_rows):
    ids, rows, ref = clip_rows
    stage = EncodeStage(ModelSpec(tiny_clip), device="cpu", batch_size=N)
    real = stage.embed
    sizes = []

    def embed(features):
        n = features["pixel_values"].shape[0]
        sizes.append(n)
        if n > 3:
            raise oom(n)
        return real(features)

    stage.embed = embed
    out = stage(rows)
    found = embedded(out)
    assert set(found) == set(ids)
    check_equal_st(found, ids, ref)
    # 12 -> 6 + 6 -> 3 + 3 + 3 + 3: halves, not one record at a time
    assert sizes == [12, 6, 3, 3, 6, 3, 3]
    assert stage.device_use.oom_splits == 3


def test_only_a_record_that_fails_alone_becomes_an_error_row(tiny_clip, clip_rows):
    ids, rows, ref = clip_rows
    stage = EncodeStage(ModelSpec(tiny_clip), device="cpu", batch_size=N)
    real = stage.embed

    def embed(features):
        pixels = features["pixel_values"]
        flat = pixels.flatten(2).std(dim=2).amax(dim=1) < 1e-6  # the grey record: flat in every channel
        if flat.any():
            raise oom(pixels.shape[0])
        return real(features)

    stage.embed = embed
    out = stage(rows)
    found = embedded(out)
    assert set(found) == set(ids[:-1])
    check_equal_st(found, ids, ref, skip={ids[-1]})
    err = {r["id"]: r for r in out.select(["id", "stage", "error"]).to_pylist() if r["error"]}
    assert list(err) == [ids[-1]]
    assert err[ids[-1]]["stage"] == "encode" and "OutOfMemoryError" in err[ids[-1]]["error"]


def test_out_of_memory_reported_at_the_sync_reruns_the_batch_split(tiny_clip, clip_rows):
    """CUDA raises some failures only when the host waits for results: those batches are rerun."""
    ids, rows, ref = clip_rows
    stage = EncodeStage(ModelSpec(tiny_clip), device="cpu", batch_size=N)
    real = stage._to_host
    seen = []

    def to_host(emb):
        seen.append(emb.shape[0])
        if emb.shape[0] > 4:
            raise oom(emb.shape[0])
        return real(emb)

    stage._to_host = to_host
    out = stage(rows)
    found = embedded(out)
    assert set(found) == set(ids)
    check_equal_st(found, ids, ref)
    assert seen == [12, 6, 3, 3, 6, 3, 3]


def test_any_other_failure_at_the_sync_is_not_swallowed(tiny_clip, clip_rows):
    _, rows, _ = clip_rows
    stage = EncodeStage(ModelSpec(tiny_clip), device="cpu", batch_size=N)

    def to_host(emb):
        raise RuntimeError("CUDA error: device-side assert triggered")

    stage._to_host = to_host
    with pytest.raises(RuntimeError, match="device-side assert"):
        stage(rows)


def test_every_output_block_carries_the_actors_running_figures(tiny_clip, clip_rows):
    ids, rows, _ = clip_rows
    stage = EncodeStage(ModelSpec(tiny_clip), device="cpu", batch_size=4)
    first = stage(rows)
    second = stage(rows.slice(0, 5))
    snaps = [json.loads(t.column(STATS_COLUMN)[0].as_py()) for t in (first, second)]
    assert first.column(STATS_COLUMN).null_count == first.num_rows - 1
    assert [s["calls"] for s in snaps] == [1, 2]
    assert snaps[0]["actor"] == snaps[1]["actor"]
    for s in snaps:
        assert 0 < s["forward_s"] <= s["wall_s"]
    # forward time only grows; the summary keeps the latest snapshot per actor
    assert snaps[1]["forward_s"] > snaps[0]["forward_s"]
    merged = latest({}, [first.column(STATS_COLUMN)[0].as_py(), second.column(STATS_COLUMN)[0].as_py()])
    use = summarise(merged)
    assert use["encoders"] == 1 and use["forward_s"] == pytest.approx(snaps[1]["forward_s"], abs=1e-3)
    assert 0 < use["busy_fraction"] <= 1
    assert use["encode_window_s"] == pytest.approx(snaps[1]["last_at"] - snaps[0]["first_at"], abs=1e-3)
    assert use["encode_window_s"] >= use["forward_s"]


def test_overlapping_forward_intervals_count_once():
    use = DeviceUse(torch.device("cpu"), actor="a")
    use._count([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)])
    assert use.busy_s == pytest.approx(4.0)
    use._count([(2.5, 3.5)])  # a concurrent call's interval, read later
    assert use.busy_s == pytest.approx(4.0)


def test_the_manifest_reports_device_use_and_no_shard_holds_the_figures(ray_session, tiny_clip, tmp_path):
    imgs = [image_bytes(i, size=(40, 36)) for i in range(10)]
    src = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [f"i{i}" for i in range(10)], "image": pa.array(imgs, pa.binary())}), src)
    for executor in ("local", "ray"):
        out = tmp_path / executor
        argv = ["--input", src, "--output", out, "--model", tiny_clip, "--batch-size", 4, "--executor", executor]
        assert run_job("pipelines.embed", argv) == 0
        emb, errors, manifest = read_output(out)
        assert len(emb) == 10 and not errors
        use = manifest["device_use"]
        assert use["encoders"] == 1 and use["devices"][0].startswith("cpu")
        assert 0 < use["busy_fraction"] <= 1 and use["forward_s"] > 0
        for f in manifest["files"]:
            assert STATS_COLUMN not in pq.read_schema(out / f["name"]).names


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_staged_copies_equal_plain_copies_and_reuse_their_buffers(tiny_clip, clip_rows):
    ids, rows, ref = clip_rows
    outs = {}
    for mode in ("staged", "pinned", "plain"):
        stage = EncodeStage(ModelSpec(tiny_clip), device="cuda", batch_size=4, copy_mode=mode)
        for _ in range(5):
            out = stage(rows)
        outs[mode] = embedded(out)
        if mode == "staged":
            # pixel_values: one class per batch in flight, reused across the five calls
            assert stage._staging.allocated <= 8
    for mode in ("staged", "pinned"):
        for id_ in ids:
            assert np.array_equal(outs[mode][id_], outs["plain"][id_])
    check_equal_st(outs["plain"], ids, ref)


@cuda
def test_cuda_device_use_has_utilisation_memory_and_a_name(tiny_clip, clip_rows):
    _, rows, _ = clip_rows
    stage = EncodeStage(ModelSpec(tiny_clip), device="cuda", batch_size=4)
    for _ in range(3):
        out = stage(rows)
    snap = json.loads(out.column(STATS_COLUMN)[0].as_py())
    assert snap["device"] == torch.cuda.get_device_name()
    assert snap["peak_memory_bytes"] > 0 and 0 < snap["forward_s"] <= snap["wall_s"]
