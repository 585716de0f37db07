"""Decoding fetched bytes into what ST's processors take. Runs in the CPU pool only."""

from __future__ import annotations

import io
import os

EXIF_ORIENTATION = 0x0112
# Freed image buffers Pillow keeps for reuse in a decoding process (see reuse_image_memory).
IMAGE_BLOCKS_KEPT = 256


def reuse_image_memory() -> None:
    """Let Pillow reuse freed image buffers instead of returning each one to the OS.

    By default Pillow frees every decoded image's pixel buffer back to the system and maps a new
    one for the next, so each photo pays for faulting in fresh pages (a 640x480 photo: 1.2 MB).
    With a preprocess block's photos alive at once, that was a fifth of the preprocess time
    (benchmarks/RESULTS.md, "Decode memory reuse"). Pixels are the same either way.
    The cache holds only buffers that were alive at once before, so memory stays at the stage's
    own high-water mark. An explicit PILLOW_BLOCKS_MAX in the environment is left as set.
    """
    if "PILLOW_BLOCKS_MAX" in os.environ:
        return
    from PIL import Image

    if Image.core.get_blocks_max() < IMAGE_BLOCKS_KEPT:
        Image.core.set_blocks_max(IMAGE_BLOCKS_KEPT)


class DecodeError(Exception):
    """A record's media could not be decoded; the message becomes the error row's reason."""


def draft_size(w: int, h: int, edge: int) -> tuple[int, int]:
    """The smallest size Pillow's JPEG draft may reduce a w x h image to and keep its shorter side >= edge."""
    short = min(w, h)
    return -(-w * edge // short), -(-h * edge // short)


def decode_image(data: bytes, *, max_pixels: int, draft_edge: int | None = None):
    """A Pillow RGB image as ST would decode these bytes. With draft_edge (--fast-decode), a JPEG at least twice
    that size on its shorter side is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain, never below it: not
    the pixels ST decodes."""
    from PIL import Image

    # The size check below reads only the header, before any pixel is decoded; Pillow's own
    # check stays as a backstop (it raises past 2x the limit). Its 1x-2x warning is not used:
    # `warnings.catch_warnings` is process-global and this runs on several fetch threads.
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise DecodeError(f"image of {w}x{h} pixels exceeds the {max_pixels}-pixel limit (--max-image-pixels)")
        if draft_edge and img.format == "JPEG" and min(w, h) >= 2 * draft_edge:
            img.draft("RGB", draft_size(w, h, draft_edge))
        img.load()
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"image exceeds the pixel limit (--max-image-pixels): {exc}") from None
    except Image.UnidentifiedImageError:
        raise DecodeError(f"undecodable image: not in an image format Pillow reads (starts {data[:16]!r})") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this record's problem
        raise DecodeError(f"undecodable image ({type(exc).__name__}: {exc})") from None
    # A 16-bit grey PNG (also a 16-bit grey TIFF) opens as I;16 (as I in older Pillow).
    sixteen_bit = img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG")
    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
        # Upright, as ST's own image loading (transformers' load_image) turns a rotated phone photo.
        from PIL import ImageOps

        img = ImageOps.exif_transpose(img)
    if sixteen_bit:
        img = _high_byte(img)
    if img.format == "GIF" and img.mode in ("P", "L") and isinstance(img.info.get("transparency"), int):
        return _gif_on_background(img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    # ST decodes a path with torchvision in RGB mode, which ignores a palette/grey/RGB PNG's
    # transparent colour as it ignores an alpha channel. Left in `info`, that colour would make the
    # processor composite every pixel of that colour onto white, unlike ST on the same file.
    img.info.pop("transparency", None)
    return img


def _high_byte(img):
    """8-bit grey from 16-bit grey: the high byte of each sample.

    Pillow's convert clips 16-bit values to 255, so all but the darkest pixels came out white. ST
    on the path is no better: torchvision decodes the PNG to uint16 and the processor rescales that
    as if it were 8-bit (values up to 257 where 1 is white). The high byte is what Pillow keeps of
    a 16-bit RGB(A) PNG and what torchvision's to_dtype(uint8, scale=True) gives for the uint16.
    """
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))


def _gif_on_background(img):
    """A GIF's first frame with its transparent pixels in the GIF's background colour.

    That is how ST sees the path: torchvision's GIF decoder starts from a canvas of the logical
    screen's background colour (an entry of the global colour table) and leaves it showing where a
    pixel holds the transparent index. Pillow would give those pixels the transparent index's own
    palette colour instead, which nothing displays.
    """
    import numpy as np
    from PIL import Image

    index = np.asarray(img)
    rgb = np.array(img.convert("RGB"))
    transparent = index == img.info["transparency"]
    if transparent.any():
        palette = getattr(img, "global_palette", None)
        colours = palette.palette if palette is not None else bytes(img.getpalette() or [])
        colours = np.frombuffer(bytes(colours), np.uint8)[: len(colours) // 3 * 3].reshape(-1, 3)
        background = img.info.get("background", 0)
        rgb[transparent] = colours[background] if background < len(colours) else 0
    return Image.fromarray(rgb)


def decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"text file is not UTF-8: {exc}") from None


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Chunks whose meaning a decoder may or may not apply (gamma, colour profiles, transparency, orientation): a
# PNG holding one goes through Pillow, as ever.
_PNG_UNSURE = {b"gAMA", b"iCCP", b"cHRM", b"sRGB", b"sBIT", b"tRNS", b"eXIf"}


def plain_png(data: bytes, *, max_pixels: int) -> bool:
    """True for an 8-bit RGB PNG, not interlaced, within the pixel limit and without any chunk a decoder might
    apply differently: what torchvision and Pillow decode to the same pixels. Reads the chunk headers only."""
    if not data.startswith(PNG_MAGIC) or len(data) < 33 or data[12:16] != b"IHDR":
        return False
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, colour, interlace = data[24], data[25], data[28]
    if depth != 8 or colour != 2 or interlace != 0 or w * h > max_pixels or not w or not h:
        return False
    pos = 8
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        if kind == b"IDAT":
            return True
        if kind in _PNG_UNSURE:
            return False
        pos += 12 + length
    return False


def decode_png_tensor(data: bytes):
    """A plain PNG (`plain_png`) as a [3, H, W] uint8 tensor, decoded by torchvision's libpng as ST decodes an
    image path: the same pixels as Pillow's decode, about 1.5x faster on 1280x800 screenshots
    (benchmarks/RESULTS.md), and no Pillow image for a fast processor to copy into a tensor."""
    import torch
    from torchvision.io import ImageReadMode, decode_png

    try:
        return decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        raise DecodeError(f"undecodable image (PNG: {exc})") from None


def decode_jpeg_tensor(data: bytes):
    """A plain baseline RGB JPEG (media/device_decode.jpeg_for_device) as a [3, H, W] uint8 tensor, decoded
    by torchvision's libjpeg-turbo, as ST decodes an image path: the same pixels as Pillow's decode
    (tests/test_image_variants.py), without Pillow's image object and the copy into a tensor that a fast
    processor makes of it."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
