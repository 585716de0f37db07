"""Decoding fetched bytes into what ST's processors take. Runs in the CPU pool only."""

from __future__ import annotations

import io


class DecodeError(Exception):
    """A record's media could not be decoded; the message becomes the error row's reason."""


def decode_image(data: bytes, *, max_pixels: int):
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
        img.load()
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"image exceeds the pixel limit (--max-image-pixels): {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this record's problem
        raise DecodeError(f"undecodable image ({type(exc).__name__}: {exc})") from None
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"text file is not UTF-8: {exc}") from None
