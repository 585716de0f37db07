"""uint8 pixels across the Ray boundary (mmembed/models/pixel_tail.py): exact against the processor's own
output, the default where exact, and the float transport kept (and said) where not."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mmembed.media.device_decode import image_processor
from mmembed.models.features import collate, feature_rows
from mmembed.models.loading import ModelSpec, load_model
from mmembed.models.pixel_tail import check, tail_of
from tests.conftest import run_job
from tests.helpers import image_bytes, read_output


def _images():
    from PIL import Image

    rng = np.random.default_rng(11)
    out = {}
    for i, (w, h, mode) in enumerate([(640, 480, "RGB"), (1280, 800, "RGB"), (33, 71, "RGB"), (200, 150, "L"),
                                      (120, 90, "RGBA"), (224, 224, "RGB")]):
        arr = rng.integers(0, 256, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
        img = Image.fromarray(arr, "RGBA" if mode == "RGBA" else "RGB")
        img = img.convert("L") if mode == "L" else img
        buf = io.BytesIO()
        img.save(buf, format="PNG" if mode != "RGB" or i % 2 else "JPEG", quality=90)
        out[f"r{i}"] = buf.getvalue()
    return out


@pytest.mark.parametrize("kind", ["tiny_clip", "tiny_qwen3vl"])
def test_uint8_pixels_with_the_tail_equal_the_processor(kind, request):
    """The preprocess stage's uint8 rows, collated and given the tail as the encoder does, equal the
    processor's float pixels for the same records (max |delta| <= 1e-6), at a quarter of the bytes."""
    from mmembed.stages.preprocess import PreprocessStage

    spec = ModelSpec(request.getfixturevalue(kind))
    model = load_model(spec, weights=False)
    verdict = check(model)
    assert verdict["transport"] == "uint8" and verdict["max_abs_diff"] <= 1e-6, verdict
    images = _images()
    batch = pa.table({"id": list(images), "image_bytes": pa.array(list(images.values()), pa.binary())})
    raw = PreprocessStage(spec, uint8_pixels=True, fetch_threads=1)(batch)
    flt = PreprocessStage(spec, fetch_threads=1)(batch)
    tail = tail_of(image_processor(model))[0]
    for a, b in zip(feature_rows(raw), feature_rows(flt)):
        assert a["error"] is None and b["error"] is None
        got, want = collate([a]), collate([b])
        assert got["pixel_values"].dtype == torch.uint8 and want["pixel_values"].dtype == torch.float32
        assert got["pixel_values"].numel() * 4 == want["pixel_values"].numel() * want["pixel_values"].element_size()
        # The same float32 operations as the fast processor: the same bits, not merely within 1e-6.
        assert torch.equal(tail.apply(got["pixel_values"]), want["pixel_values"])
        assert all(torch.equal(got[k], want[k]) for k in want if k != "pixel_values" and torch.is_tensor(want[k]))


def test_a_tail_that_is_not_exact_keeps_the_float_transport(tiny_clip, monkeypatch):
    from mmembed.models import pixel_tail

    model = load_model(ModelSpec(tiny_clip), weights=False)
    real = pixel_tail.tail_of

    def off_by_a_little(ip):
        tail, why = real(ip)
        return pixel_tail.PixelTail(tuple(s + 1e-3 for s in tail.shift), tail.divisor, tail.group), why

    monkeypatch.setattr(pixel_tail, "tail_of", off_by_a_little)
    verdict = pixel_tail.check(model)
    assert verdict["transport"] == "float32" and "differs from the processor" in verdict["reason"]
    ip = image_processor(model)
    ip.do_rescale = ip.do_normalize = False
    verdict = real(ip)
    assert verdict[0] is None and "neither rescales nor normalises" in verdict[1]


def test_the_embed_job_ships_uint8_by_default_and_says_so(tiny_clip, tmp_path):
    from sentence_transformers import SentenceTransformer

    from tests.helpers import decoded

    images = {f"i{i}": image_bytes(40 + i, fmt="JPEG" if i % 2 else "PNG", size=(64 + 16 * i, 48)) for i in range(6)}
    pq.write_table(pa.table({"id": list(images), "image": pa.array(list(images.values()), pa.binary())}),
                   tmp_path / "m.parquet")
    outs = {}
    for name, extra in {"default": [], "float16": ["--transport-dtype", "float16"],
                        "float32": ["--transport-dtype", "float32"]}.items():
        out = tmp_path / name
        assert run_job("pipelines.embed", ["--input", tmp_path / "m.parquet", "--output", out, "--model", tiny_clip,
                                           "--executor", "local", *extra]) == 0
        outs[name] = read_output(out)
    emb, errors, manifest = outs["default"]
    assert not errors and manifest["model"]["pixels"]["transport"] == "uint8"
    assert outs["float16"][2]["model"]["pixels"] == {"transport": "float16", "reason": "--transport-dtype"}
    st = SentenceTransformer(tiny_clip, device="cpu")
    ref = st.encode([decoded(images[k]) for k in images], convert_to_numpy=True)
    assert max(float(np.abs(emb[k] - ref[i]).max()) for i, k in enumerate(images)) <= 1e-5
    text = json.loads((tmp_path / "default" / "_manifest.json").read_text())
    assert text["model"]["pixels"]["max_abs_diff"] <= 1e-6
