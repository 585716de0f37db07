"""--fast-decode: opt-in DCT-domain downscaling of large JPEGs (Pillow draft), never the default, never below
the processor's target, refused where the processor does not resize to a shortest edge."""

from __future__ import annotations

import io
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from mmembed.media.decode import decode_image
from mmembed.testing.corpus import make_photo
from tests.conftest import run_job


def _jpeg(w: int, h: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(make_photo(seed, w, h))).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_draft_decodes_large_jpegs_smaller_but_never_below_the_target():
    big = _jpeg(1024, 768)
    assert decode_image(big, max_pixels=10**8).size == (1024, 768)  # the default: a full decode
    assert decode_image(big, max_pixels=10**8, draft_edge=224).size == (512, 384)  # 1/2: 384 >= 224 > 192
    assert decode_image(big, max_pixels=10**8, draft_edge=96).size == (128, 96)  # 1/8: exactly the target
    assert decode_image(_jpeg(400, 300), max_pixels=10**8, draft_edge=224).size == (400, 300)  # under 2x: full
    png = io.BytesIO()
    Image.open(io.BytesIO(big)).save(png, "PNG")
    assert decode_image(png.getvalue(), max_pixels=10**8, draft_edge=32).size == (1024, 768)  # JPEG only


def test_fast_decode_is_close_to_st_not_equal_and_recorded(tiny_clip, tmp_path):
    from sentence_transformers import SentenceTransformer

    media = tmp_path / "media"
    media.mkdir()
    for i in range(4):
        (media / f"p{i}.jpg").write_bytes(_jpeg(320, 240, i))
    Image.open(io.BytesIO(make_photo(9, 320, 240))).save(media / "shot.png")
    out = tmp_path / "out"
    assert run_job("pipelines.embed", ["--input", media, "--output", out, "--model", tiny_clip, "--executor", "local",
                                       "--fast-decode"]) == 0
    t = pq.read_table(out).to_pylist()
    st = SentenceTransformer(tiny_clip, device="cpu")
    for row in t:
        want = st.encode(Image.open(media / row["id"]).convert("RGB"))
        got = np.asarray(row["embedding"], dtype=np.float32)
        cos = float(got @ want / np.linalg.norm(got) / np.linalg.norm(want))
        if row["id"].endswith(".png"):
            np.testing.assert_allclose(got, want, atol=1e-5)  # not a JPEG: decoded in full, equal to ST
        else:
            assert np.abs(got - want).max() > 1e-4 and cos > 0.9, (row["id"], cos)
    model = json.loads((out / "_manifest.json").read_text())["model"]
    assert model["fast_decode"] == {"edge": 32, "equal_to_st": False}


def test_fast_decode_is_refused_for_a_pixel_budget_processor(tiny_qwen3vl, tmp_path, capsys):
    media = tmp_path / "media"
    media.mkdir()
    (media / "p.jpg").write_bytes(_jpeg(320, 240))
    assert run_job("pipelines.embed", ["--input", media, "--output", tmp_path / "out", "--model", tiny_qwen3vl,
                                       "--fast-decode"]) == 2
    assert "shortest edge" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fast_decode_benchmark_smoke(tmp_path):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import fast_decode as bench

    out = tmp_path / "r.json"
    assert bench.main(["--smoke", "--workdir", str(tmp_path / "w"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["640x480"]["decoded_size"] == [320, 240] and report["2016x1512"]["decoded_size"] == [504, 378]
    for r in report.values():
        assert r["ratio"] > 0 and 0 < r["max_pixel_value_diff"] and -1 <= r["cosine_min"] <= 1.0001
