"""--calls-per-encoder: several calls at once on an encoder actor's threads change no output."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from sentence_transformers import SentenceTransformer

from tests.conftest import run_job
from tests.helpers import decoded, image_bytes, max_abs_diff, read_output


def test_two_calls_per_encoder_equal_st_and_keep_every_id(ray_session, tiny_clip, tmp_path):
    imgs = [image_bytes(i, size=(40 + 4 * i, 32)) for i in range(24)]
    ids = [f"i{i:02d}" for i in range(24)] + ["broken"]
    table = pa.table({"id": ids, "image": pa.array([*imgs, b"not an image"], pa.binary())})
    src = tmp_path / "m.parquet"
    pq.write_table(table, src)
    out = tmp_path / "out"
    # Windows of 4 rows: the 25 records reach the encoder as several blocks, two of them at a time.
    argv = ["--input", src, "--output", out, "--model", tiny_clip, "--batch-size", 4, "--calls-per-encoder", 2,
            "--executor", "ray"]
    assert run_job("pipelines.embed", argv) == 0
    emb, errors, manifest = read_output(out)
    assert manifest["resources"]["calls_per_encoder"] == 2
    assert set(emb) == set(ids[:24]) and set(errors) == {"broken"}
    ref = SentenceTransformer(tiny_clip, device="cpu").encode([decoded(b) for b in imgs], batch_size=4)
    assert max_abs_diff(emb, ids[:24], ref) <= 1e-5
