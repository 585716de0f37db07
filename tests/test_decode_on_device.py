"""--decode-on-device: JPEGs decoded and preprocessed by the encoder (here on the CPU, the same code
that runs with device="cuda"), every other image by the CPU pool; both equal ST on the same files."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from sentence_transformers import SentenceTransformer

from mmembed.inputs.discover import RECORD_SCHEMA
from mmembed.media.device_decode import JPEG_KEY, jpeg_for_device
from mmembed.models.loading import ModelSpec
from mmembed.stages.preprocess import PreprocessStage
from tests.conftest import run_job
from tests.helpers import make_image, read_output


def _jpeg(seed, size=(80, 60), **save):
    buf = io.BytesIO()
    img = make_image(seed, size)
    if save.pop("grey", False):
        img = img.convert("L")
    img.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def _rotated(seed):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    return _jpeg(seed, exif=exif.tobytes())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Baseline JPEGs of several sizes, plus what must stay on the CPU pool."""
    root = tmp_path_factory.mktemp("photos")
    files = {f"p{i}.jpg": _jpeg(i, size=(60 + 7 * i, 40 + 5 * i)) for i in range(10)}
    png = io.BytesIO()
    make_image(50).save(png, "PNG")
    files.update({
        "shot.png": png.getvalue(),
        "grey.jpg": _jpeg(51, grey=True),
        "progressive.jpg": _jpeg(52, progressive=True),
        "rotated.jpg": _rotated(53),
    })  # fmt: skip
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root, files


def test_only_baseline_rgb_unrotated_jpegs_leave_the_cpu_pool_as_bytes(tiny_clip, corpus):
    root, files = corpus
    names = sorted(files)
    columns = {f.name: pa.nulls(len(names), f.type) for f in RECORD_SCHEMA}
    columns["id"] = pa.array(names)
    columns["image_uri"] = pa.array([str(root / n) for n in names])
    rows = PreprocessStage(ModelSpec(tiny_clip), decode_on_device=True)(pa.table(columns, schema=RECORD_SCHEMA))
    keys = dict(zip(rows.column("id").to_pylist(), rows.column("feat_keys").to_pylist()))
    on_device = {n for n, k in keys.items() if k == [JPEG_KEY]}
    assert on_device == {f"p{i}.jpg" for i in range(10)}
    assert all(k == ["pixel_values"] for n, k in keys.items() if n not in on_device)
    # the header check alone: too many pixels, not a JPEG, corrupt
    assert not jpeg_for_device(files["p0.jpg"], max_pixels=100)
    assert not jpeg_for_device(files["shot.png"], max_pixels=10**8)
    assert not jpeg_for_device(b"\xff\xd8\xff" + b"\0" * 20, max_pixels=10**8)


@pytest.mark.parametrize("executor,decoder", [("local", "torchvision"), ("ray", "torchvision"),
                                              ("local", "nvimgcodec"), ("ray", "nvimgcodec")])
def test_embeddings_equal_st_on_the_same_files(ray_session, tiny_clip, corpus, tmp_path, executor, decoder):
    """torchvision's decoder, and nvImageCodec's (its CPU backend here: the same code path from the encoder on)."""
    if decoder == "nvimgcodec":
        pytest.importorskip("nvidia.nvimgcodec", reason="the nvimgcodec extra is not installed")
    root, files = corpus
    out = tmp_path / "out"
    argv = ["--input", root, "--output", out, "--model", tiny_clip, "--batch-size", 4,
            "--decode-on-device", "--device-decoder", decoder, "--executor", executor]  # fmt: skip
    assert run_job("pipelines.embed", argv) == 0
    emb, errors, manifest = read_output(out)
    assert not errors and set(emb) == set(files)
    assert manifest["model"]["device_decode"]["decoder"] == decoder
    names = sorted(files)
    ref = SentenceTransformer(tiny_clip, device="cpu").encode([str(root / n) for n in names], batch_size=4)
    ours = np.stack([emb[n] for n in names]).astype(np.float64)
    cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.999, dict(zip(names, cos))
    # On the CPU both decoders are libjpeg: the pixels, and so the vectors, agree far closer than that.
    assert np.abs(ours - ref).max() <= 1e-4


@pytest.mark.parametrize("decoder", ["torchvision", "nvimgcodec"])
def test_a_corrupt_jpeg_becomes_an_error_row_and_the_job_goes_on(ray_session, tiny_clip, tmp_path, decoder):
    if decoder == "nvimgcodec":
        pytest.importorskip("nvidia.nvimgcodec", reason="the nvimgcodec extra is not installed")
    root = tmp_path / "in"
    root.mkdir()
    for i in range(4):
        (root / f"p{i}.jpg").write_bytes(_jpeg(i))
    good = _jpeg(9)
    (root / "cut.jpg").write_bytes(good[: len(good) // 2])  # the header reads, the scan does not
    out = tmp_path / "out"
    argv = ["--input", root, "--output", out, "--model", tiny_clip, "--decode-on-device", "--executor", "local",
            "--device-decoder", decoder]
    assert run_job("pipelines.embed", argv) == 0
    emb, errors, _ = read_output(out)
    assert set(emb) == {f"p{i}.jpg" for i in range(4)}
    assert set(errors) == {"cut.jpg"} and errors["cut.jpg"]["error"]


def test_a_model_without_clip_style_pixels_is_refused_before_ray_starts(tiny_qwen3vl, tmp_path, capsys):
    root = tmp_path / "in"
    root.mkdir()
    (root / "p.jpg").write_bytes(_jpeg(1))
    argv = ["--input", root, "--output", tmp_path / "out", "--model", tiny_qwen3vl, "--decode-on-device"]
    assert run_job("pipelines.embed", argv) == 2
    err = capsys.readouterr().err
    assert "--decode-on-device cannot serve model" in err and "pixel_values" in err


def test_nvimgcodec_asked_for_but_missing_is_refused_before_ray_starts(tiny_clip, tmp_path, capsys, monkeypatch):
    from mmembed.media import device_decode

    monkeypatch.setattr(device_decode, "nvimgcodec_installed", lambda: False)
    root = tmp_path / "in"
    root.mkdir()
    (root / "p.jpg").write_bytes(_jpeg(1))
    argv = ["--input", root, "--output", tmp_path / "out", "--model", tiny_clip, "--decode-on-device",
            "--device-decoder", "nvimgcodec"]
    assert run_job("pipelines.embed", argv) == 2
    err = capsys.readouterr().err
    assert "nvImageCodec is not installed" in err and "mmembed[nvimgcodec-cu13]" in err
    assert not (tmp_path / "out").exists()
    assert device_decode.resolve_decoder("auto") == "torchvision"  # auto falls back to torchvision's nvJPEG
    argv[-1] = "torchvision"
    argv[-3:-3] = ["--hw-decode-share", "1.5"]
    assert run_job("pipelines.embed", argv) == 2
    assert "--hw-decode-share is a share" in capsys.readouterr().err
