"""Two copies of every pixel that the image processor makes and mmembed's CPU pool need not.

1. Channel-first input. transformers' torchvision backend makes each input image a channel-first contiguous
   tensor (`process_image`) before it resizes. A decoded image (torchvision's decode, a Pillow image) is
   channels-last in memory, so that is a full-size transposing copy, and torch's uint8 antialiased resize
   is faster on channels-last input anyway: on this machine the processor's own work on a 640x480 photo
   went from 1.8 to 0.8 ms, on a 1280x800 screenshot from 6.6 to 4.1 ms. The pool hands the processor the
   channel-first *view* of the decoded pixels instead. It is kept only where a check at actor start finds
   every feature equal, bit for bit, to the processor's own path (`channels_last_exact`).

2. Qwen-VL frames (with uint8 transport only). The processor's `patchify` copies every resized pixel twice
   (the temporal patch) into patch order. The pool ships the resized frame instead, in its memory order
   (height, width, channel), as rows of one patch's worth of pixels: a grid of t x h x w patches is still
   t x h x w rows, so splitting a batch by the grid and collating work as before. The encoder runs the
   processor's own `patchify` on its device (`unfold`), then the tail (pixel_tail.py). Half the bytes
   across Ray and no patch copy on the CPU. The plan checks it exact against ST's preprocess on probe
   images (pixel_tail.check) and says in the manifest which layout the run used.
"""

from __future__ import annotations

FRAMES = "frames"
PATCHES = "patches"


# ---------------------------------------------------------------------------------------------
# 1. Channel-first views instead of channel-first copies
# ---------------------------------------------------------------------------------------------
def _channels_last_view(image):
    """The [3, H, W] uint8 view of an RGB image's pixels as they lie in memory, or None where the
    processor's own conversion has more to do (other modes, channel counts, dtypes)."""
    import numpy as np
    import torch
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            return None
        image = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.dtype != torch.uint8:
        return None
    if image.shape[0] != 3 or image.stride(0) != 1 or image.stride(2) != 3 or image.device.type != "cpu":
        return None
    return image


def keep_channels_last(ip) -> None:
    """Let `ip` (a torchvision-backend image processor) take RGB images as channel-first views."""
    original = type(ip).process_image

    def process_image(image, *args, **kwargs):
        plain = not args and kwargs.get("device") is None and kwargs.get("input_data_format") is None
        view = _channels_last_view(image) if plain else None
        return view if view is not None else original(ip, image, *args, **kwargs)

    ip.process_image = process_image


def release(ip, *names: str) -> None:
    """Undo this module's instance hooks on `ip` (all of them by default)."""
    for name in names or ("process_image", "patchify"):
        ip.__dict__.pop(name, None)


def channels_last_exact(model) -> bool:
    """Whether `keep_channels_last` leaves this model's features the same bits as ST's own preprocess, on a
    Pillow RGB image and on decoded JPEG and PNG tensors (the inputs the pool hands it), checked once."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from mmembed.media.device_decode import image_processor
    from mmembed.models.features import same_features

    ip = image_processor(model)
    if ip is None or not hasattr(type(ip), "process_image") or not model.supports("image"):
        return False
    rng = np.random.default_rng(9)
    try:
        probes = []
        for size, fmt in (((83, 61), "JPEG"), ((640, 480), "PNG"), ((37, 301), "PNG")):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            # Built from arrays, not opened: Image.open would apply the job's --max-image-pixels bomb limit.
            probes.append(Image.fromarray(arr))
            buf = io.BytesIO()
            probes[-1].save(buf, format=fmt, quality=90)
            from torchvision.io import ImageReadMode, decode_image

            probes.append(decode_image(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8),
                                       mode=ImageReadMode.RGB))
        want = [model.preprocess([p]) for p in probes]
        keep_channels_last(ip)
        got = [model.preprocess([p]) for p in probes]
        same = all(same_features(a, b, exact=True) for a, b in zip(want, got))
    except Exception:  # noqa: BLE001 - any doubt keeps the processor's own path
        same = False
    release(ip, "process_image")
    return same


# ---------------------------------------------------------------------------------------------
# 2. Qwen-VL frames
# ---------------------------------------------------------------------------------------------
def frames_reason(ip) -> str | None:
    """None where `ip` patchifies as Qwen-VL's processors do (a `patchify` method and the three sizes),
    else why frames cannot be shipped for it."""
    if ip is None:
        return "the model has no image processor"
    if not callable(getattr(type(ip), "patchify", None)):
        return f"{type(ip).__name__} has no patchify step"
    if not all(getattr(ip, k, None) for k in ("patch_size", "merge_size", "temporal_patch_size")):
        return f"{type(ip).__name__} has no patch, merge and temporal patch sizes"
    return None


def ship_frames(ip) -> None:
    """Make `ip`'s patchify return each resized image as frame rows (height, width, channel order), one
    patch's worth of pixels per row, and the grid it would have given."""

    def patchify(images, patch_size, merge_size, temporal_patch_size):
        n, channels, height, width = images.shape
        grid_h, grid_w = height // patch_size, width // patch_size
        # A view where the resize left the frame channels-last (see keep_channels_last), else one copy.
        rows = images.permute(0, 2, 3, 1).reshape(n, grid_h * grid_w, channels * patch_size * patch_size)
        return rows, grid_h, grid_w

    ip.patchify = patchify


def unfold(pixels, grid, ip):
    """Frame rows (`ship_frames`) back to the processor's patch rows, by the processor's own patchify, on
    whatever device `pixels` is on: concatenated rows [sum t*h*w, C*P*P], or ColQwen2's padded
    [records, rows, C*P*P]."""
    import torch

    patch, merge, temporal = int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)
    channels = pixels.shape[-1] // (patch * patch)
    counts = grid.prod(dim=1).tolist()
    padded = pixels.ndim == 3
    parts = [pixels[i, :c] for i, c in enumerate(counts)] if padded else torch.split(pixels, counts)
    out = []
    for rows, (t, h, w) in zip(parts, grid.tolist()):
        if t != 1:
            raise ValueError(f"frame rows with a temporal grid of {t}: only still images are shipped as frames")
        frame = rows.reshape(1, h * patch, w * patch, channels).permute(0, 3, 1, 2)
        patches, _, _ = type(ip).patchify(ip, frame, patch_size=patch, merge_size=merge,
                                          temporal_patch_size=temporal)
        out.append(patches[0])
    if not padded:
        return torch.cat(out) if len(out) > 1 else out[0]
    full = pixels.new_zeros((pixels.shape[0], pixels.shape[1], out[0].shape[-1]))
    for i, patches in enumerate(out):
        full[i, : len(patches)] = patches
    return full
