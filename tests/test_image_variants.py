"""Images as phones, scanners and the web make them, against ST `encode` on the same files.

ST hands an image path to the model's image processor, which decodes it with torchvision in RGB
mode (EXIF orientation applied, a PNG's alpha or transparent colour ignored, a GIF's transparent
pixels in its background colour, an animation's first frame). mmembed decodes with
Pillow, so each kind of file where the two could part is written here and embedded from a directory
listing and from a Parquet manifest of bytes, with tiny CLIP and tiny Qwen3-VL. Where ST cannot take
the path (BMP, TIFF: torchvision refuses them) the reference is ST given the image as transformers'
`load_image` decodes it; for 16-bit greyscale, where ST's own result is wrong (a PNG rescaled as if
8-bit, a TIFF clipped to white), it is ST given the 16-bit samples scaled to 8 bits as torchvision
scales them. Max |diff| <= 1e-5 in fp32 on CPU.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import run_job
from tests.helpers import make_image, read_output

TOL = 1e-5


def _save(img, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def variants() -> dict[str, bytes]:
    """File name -> bytes, one per kind of image that reaches a corpus."""
    photo = make_image(7, size=(64, 48))
    other = make_image(8, size=(64, 48))
    rng = np.random.default_rng(7)
    grey16 = rng.integers(0, 65536, (48, 64), dtype=np.uint16)
    rotated = Image.Exif()
    rotated[0x0112] = 6  # a phone held upright: the sensor's image is turned 90 degrees on display
    rgba = photo.copy()
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (48, 64), dtype=np.uint8)))
    return {
        "exif6.jpg": _save(photo, "JPEG", quality=90, exif=rotated.tobytes()),
        # A scanner's or a medical/astronomy export's 16-bit greyscale, over the whole 16-bit range.
        "grey16.png": _save(Image.fromarray(grey16), "PNG"),
        # Index 3 is transparent: about one pixel in 16 carries the transparent colour.
        "palette_t.png": _save(photo.quantize(16), "PNG", transparency=3),
        "cmyk.jpg": _save(photo.convert("CMYK"), "JPEG", quality=90),
        "grey.jpg": _save(photo.convert("L"), "JPEG", quality=90),
        "rgba.png": _save(rgba, "PNG"),
        "photo.webp": _save(photo, "WEBP", quality=80),
        "web.gif": _save(photo, "GIF"),
        # Transparent pixels show the GIF's background colour (entry 5 here), as torchvision draws them.
        "transparent.gif": _save(photo.quantize(16), "GIF", transparency=3, background=5),
        # An animation is embedded by its first frame, as ST does with the path.
        "animated.gif": _save(photo, "GIF", save_all=True, append_images=[other], duration=100, loop=0),
        "grey_alpha.png": _save(photo.convert("LA"), "PNG"),
        "scan.bmp": _save(photo, "BMP"),
        "scan.tiff": _save(photo, "TIFF"),
        "rgba.tiff": _save(rgba, "TIFF"),
        "grey16.tiff": _save(Image.fromarray(grey16), "TIFF"),
    }


def st_reference(st, path: str) -> np.ndarray:
    """ST on the path; for files its image processor refuses, ST on the image load_image decodes."""
    from transformers.image_utils import load_image

    if "grey16" in path:
        # ST on a 16-bit PNG path hands the processor torchvision's uint16 samples, which it rescales
        # as if they were 8-bit (up to 257 where 1 is white); load_image (for the TIFF, which
        # torchvision cannot read) clips them to white. The reference is ST on the 16-bit samples
        # scaled to 8 bits as torchvision scales them.
        import torch
        from torchvision.io import ImageReadMode, decode_image
        from torchvision.transforms.v2.functional import to_dtype

        if path.endswith(".png"):
            samples = decode_image(path, mode=ImageReadMode.RGB)
        else:
            grey = torch.from_numpy(np.asarray(Image.open(path)).astype(np.int32)).to(torch.uint16)
            samples = grey.expand(3, -1, -1)
        return st.encode([to_dtype(samples, torch.uint8, scale=True)])[0]
    if path.endswith("animated.gif") and type(st[0].processor).__name__.startswith("Qwen"):
        # torchvision hands Qwen's image processor every frame, which it cannot take.
        with pytest.raises(ValueError, match="too many values to unpack"):
            st.encode([path])
        return st.encode([load_image(path)])[0]
    if path.endswith((".bmp", ".tiff")):
        with pytest.raises(RuntimeError, match="Unsupported image file"):
            st.encode([path])
        return st.encode([load_image(path)])[0]
    return st.encode([path])[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    files = variants()
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root, files


@pytest.mark.parametrize("model", ["tiny_clip", "tiny_qwen3vl"])
@pytest.mark.parametrize("given", ["listing", "manifest"])
def test_image_variants_equal_st_on_the_same_files(request, model, given, corpus, tmp_path):
    from sentence_transformers import SentenceTransformer

    model_dir = request.getfixturevalue(model)
    root, files = corpus
    names = sorted(files)
    if given == "listing":
        source = root
    else:
        source = tmp_path / "manifest.parquet"
        pq.write_table(pa.table({"id": names, "image": pa.array([files[n] for n in names], pa.binary())}), source)
    out = tmp_path / "out"
    argv = ["--input", source, "--output", out, "--model", model_dir, "--batch-size", 4, "--executor", "local"]
    assert run_job("pipelines.embed", argv) == 0
    emb, errors, _ = read_output(out)
    assert not errors and set(emb) == set(names)

    st = SentenceTransformer(model_dir, device="cpu")
    diffs = {n: float(np.abs(emb[n] - st_reference(st, str(root / n))).max()) for n in names}
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("model", ["tiny_clip", "tiny_qwen3vl"])
def test_plain_jpegs_decoded_to_tensors_give_the_pillow_features(request, model):
    """Plain baseline JPEGs skip Pillow (torchvision's libjpeg-turbo straight to a [3, H, W] tensor); the
    features are the same as from the Pillow image, and every other kind still goes through Pillow."""
    import torch

    from mmembed.models.features import collate, feature_rows
    from mmembed.models.loading import ModelSpec
    from mmembed.stages.preprocess import PreprocessStage, _PlainJpeg

    files = {**variants(), **{f"photo{i}.jpg": _save(make_image(30 + i, size=(320 - 40 * i, 240)), "JPEG",
                                                       quality=90) for i in range(4)}}
    stage = PreprocessStage(ModelSpec(request.getfixturevalue(model)), fetch_threads=1)
    assert stage.jpeg_tensors
    plain = [name for name, data in files.items() if isinstance(stage._media({"image_bytes": data}, "image"),
                                                                   _PlainJpeg)]
    assert len(plain) >= 4 and all(name.endswith(".jpg") for name in plain)
    batch = pa.table({"id": list(files), "image_bytes": pa.array(list(files.values()), pa.binary())})
    fast = feature_rows(stage(batch))
    stage.jpeg_tensors = False
    slow = feature_rows(stage(batch))
    for a, b in zip(fast, slow):
        assert (a["error"], a["feat_keys"]) == (b["error"], b["feat_keys"]), a["id"]
        if a["error"] is None:
            x, y = collate([a]), collate([b])
            assert all(torch.equal(x[k], y[k]) for k in y if torch.is_tensor(y[k])), a["id"]


@pytest.mark.parametrize("model", ["tiny_clip", "tiny_qwen3vl"])
def test_plain_pngs_decoded_to_tensors_give_the_pillow_features(request, model):
    """Plain 8-bit RGB PNGs (screenshots) skip Pillow too (torchvision's libpng); every other PNG (palette,
    alpha, 16-bit, grey, gamma or transparency chunks) and every other format still goes through Pillow, and
    the features are the same either way; a broken plain PNG is an error row either way."""
    import torch

    from mmembed.models.features import collate, feature_rows
    from mmembed.models.loading import ModelSpec
    from mmembed.stages.preprocess import PreprocessStage, _PlainPng
    from mmembed.testing.corpus import make_screenshot

    import zlib

    photo = make_image(12, size=(96, 64))
    png = _save(photo, "PNG")
    chunk = b"gAMA" + (45455).to_bytes(4, "big")
    gamma = png[:33] + (4).to_bytes(4, "big") + chunk + zlib.crc32(chunk).to_bytes(4, "big") + png[33:]
    files = {**variants(), "screen.png": make_screenshot(3, 200, 120), "photo.png": png,
             "optimized.png": _save(photo, "PNG", optimize=True), "gamma.png": gamma, "rgb_t.png": _save(photo, "PNG", transparency=(0, 0, 0)),
             "grey.png": _save(photo.convert("L"), "PNG"), "truncated.png": make_screenshot(4, 200, 120)[:400]}
    stage = PreprocessStage(ModelSpec(request.getfixturevalue(model)), fetch_threads=1)
    assert stage.png_tensors
    plain = {name for name, data in files.items()
             if isinstance(stage._media({"image_bytes": data}, "image"), _PlainPng)}
    assert plain == {"screen.png", "photo.png", "optimized.png", "truncated.png"}
    batch = pa.table({"id": list(files), "image_bytes": pa.array(list(files.values()), pa.binary())})
    fast = feature_rows(stage(batch))
    stage.png_tensors = False
    slow = feature_rows(stage(batch))
    for a, b in zip(fast, slow):
        assert (a["error"] is None, a["feat_keys"]) == (b["error"] is None, b["feat_keys"]), a["id"]
        if a["error"] is None:
            x, y = collate([a]), collate([b])
            assert all(torch.equal(x[k], y[k]) for k in y if torch.is_tensor(y[k])), a["id"]
        else:
            assert a["error"].startswith("undecodable image"), a["error"]
