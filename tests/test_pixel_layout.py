"""The processor's copies mmembed skips (mmembed/models/pixel_layout.py): channel-first views instead of
copies, and Qwen-VL frames patchified on the encoder's device. Both must leave every feature equal to ST's
own preprocess of the same files."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch

from mmembed.media.device_decode import image_processor
from mmembed.models.features import collate, feature_rows
from mmembed.models.loading import ModelSpec, load_model
from mmembed.models.pixel_tail import tail_of
from tests.helpers import decoded


def _files() -> dict[str, bytes]:
    """Plain JPEGs and PNGs (the tensor routes), and PNGs Pillow decodes (grey, alpha, palette), odd sizes."""
    from PIL import Image

    rng = np.random.default_rng(21)
    out = {}
    for i, (w, h, mode, fmt) in enumerate([(640, 480, "RGB", "JPEG"), (1280, 800, "RGB", "PNG"), (33, 71, "RGB", "PNG"),
                                           (200, 150, "L", "PNG"), (120, 90, "RGBA", "PNG"), (97, 203, "P", "PNG"),
                                           (301, 37, "RGB", "JPEG")]):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img = img.convert(mode) if mode != "RGB" else img
        buf = io.BytesIO()
        img.save(buf, format=fmt, quality=90)
        out[f"f{i}"] = buf.getvalue()
    return out


def _spec(kind: str, request) -> ModelSpec:
    path = request.getfixturevalue(kind)
    return ModelSpec(path, kind="multivector") if kind == "tiny_colqwen2" else ModelSpec(path)


@pytest.mark.parametrize("kind", ["tiny_clip", "tiny_qwen3vl", "tiny_colqwen2"])
def test_channel_first_views_give_st_features(kind, request):
    """The pool's processor, given views, builds the same features, bit for bit, as ST's own preprocess
    of the Pillow images, one record at a time and for the batch."""
    from mmembed.stages.preprocess import PreprocessStage

    spec = _spec(kind, request)
    files = _files()
    stage = PreprocessStage(spec, fetch_threads=1)
    assert stage.channels_last, "the check at actor start should keep the views for this processor"
    assert "process_image" in vars(image_processor(stage.model))
    rows = feature_rows(stage(pa.table({"id": list(files), "image_bytes": pa.array(list(files.values()))})))
    st = load_model(spec, weights=False)  # ST's own preprocess, no hook
    for row, data in zip(rows, files.values()):
        assert row["error"] is None, row["error"]
        got, want = collate([row]), st.preprocess([decoded(data)])
        for key, value in want.items():
            if torch.is_tensor(value):
                assert torch.equal(got[key].reshape(value.shape), value), (row["id"], key)


@pytest.mark.parametrize("kind", ["tiny_qwen3vl", "tiny_colqwen2"])
def test_frames_unfolded_on_the_encoder_equal_st_patches(kind, request):
    """Frame rows are half the bytes of uint8 patch rows, and collated in a batch, unfolded by the processor's
    own patchify and given the tail, they equal ST's float patches for the same images."""
    from mmembed.models.pixel_layout import unfold
    from mmembed.stages.preprocess import PreprocessStage

    spec = _spec(kind, request)
    files = _files()
    batch = pa.table({"id": list(files), "image_bytes": pa.array(list(files.values()))})
    frames = feature_rows(PreprocessStage(spec, uint8_pixels=True, pixel_frames=True, fetch_threads=1)(batch))
    patches = feature_rows(PreprocessStage(spec, uint8_pixels=True, fetch_threads=1)(batch))
    st = load_model(spec, weights=False)
    ip = image_processor(st)
    tail = tail_of(ip)[0]
    for f, p in zip(frames, patches):
        a, b = collate([f]), collate([p])
        assert a["pixel_values"].dtype == torch.uint8 and 2 * a["pixel_values"].numel() == b["pixel_values"].numel()
    together = collate(frames)
    got = tail.apply(unfold(together["pixel_values"], together["image_grid_thw"], ip))
    for i, data in enumerate(files.values()):
        want = st.preprocess([decoded(data)])["pixel_values"]
        n = int(together["image_grid_thw"][i].prod())
        if got.ndim == 3:  # ColQwen2: padded per record
            assert torch.equal(got[i, :n], want.reshape(-1, want.shape[-1])), i
        else:
            start = int(together["image_grid_thw"][:i].prod(dim=1).sum())
            assert torch.equal(got[start:start + n], want), i


def test_frames_the_check_refuses_keep_patch_rows_and_say_why(tiny_qwen3vl, monkeypatch):
    from mmembed.models import pixel_layout, pixel_tail

    model = load_model(ModelSpec(tiny_qwen3vl), weights=False)
    assert pixel_tail.check(model)["layout"] == "frames"
    real = pixel_layout.unfold

    def shifted(pixels, grid, ip):
        return real(pixels, grid, ip).roll(1, dims=-1)

    monkeypatch.setattr(pixel_layout, "unfold", shifted)
    verdict = pixel_tail.check(model)
    assert verdict["transport"] == "uint8" and verdict["layout"] == "patches"
    assert "differ from the processor" in verdict["layout_reason"]
    assert "patchify" not in vars(image_processor(model))  # the check leaves the processor as it found it
