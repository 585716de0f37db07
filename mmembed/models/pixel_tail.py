"""uint8 pixels across the Ray boundary: the image processor's geometric steps in the CPU pool, its affine
tail on the encoder's device.

An image processor's steps up to its last two (decode, resize, crop, Qwen-VL's patchify) leave uint8
pixels; the last two, rescale (x 1/255) and normalise ((x - mean) / std), are one per-channel affine map.
So the CPU pool runs the processor with `do_rescale` and `do_normalize` off and ships uint8 (a quarter
of float32's bytes, and no float work on the CPU), and the encoder applies the tail on its device,
as the fast (torchvision) processors compute it: (x - mean / r) / (std / r) in float32, r the rescale
factor (the same bits as the processor's own output). For
Qwen-VL's patch rows the channel of column j is j // (temporal_patch_size x patch_size^2), the order
the processor flattens a patch in.

It is only used where it is exact: before anything runs, the tail is checked against ST's own
`preprocess` on probe images (max |delta| <= 1e-6 in fp32, integral pixels, same shapes); otherwise the
pool ships the processor's float output as before, and the run's manifest says which and why.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from mmembed.media.device_decode import image_processor

TOLERANCE = 1e-6


@dataclass(frozen=True)
class PixelTail:
    """Per-channel (x - shift) / divisor on uint8 pixels; `group` 0: channels on axis 1 ([N, C, H, W]),
    n > 0: patch rows whose column j is channel j // n."""

    shift: tuple[float, ...]
    divisor: tuple[float, ...]
    group: int = 0
    scale: float | None = None  # a processor that only rescales: x * scale

    def apply(self, pixels):
        """uint8 pixels (on any device) -> float32, as the processor's own output."""
        import torch

        if self.scale is not None:
            return pixels * self.scale
        x = pixels.to(torch.float32)
        shift = torch.tensor(self.shift, dtype=torch.float32, device=x.device)
        divisor = torch.tensor(self.divisor, dtype=torch.float32, device=x.device)
        if self.group:
            channel = torch.arange(x.shape[-1], device=x.device) // self.group
            return (x - shift[channel]) / divisor[channel]
        shape = (1, len(self.shift)) + (1,) * (x.ndim - 2)
        return (x - shift.view(shape)) / divisor.view(shape)


def _channels(value, n: int = 3) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    return [float(v) for v in values]


def tail_of(ip) -> tuple[PixelTail | None, str]:
    """The tail an image processor applies last, or (None, why it has none we can move)."""
    if ip is None:
        return None, "the model has no image processor"
    do_rescale, do_normalize = bool(getattr(ip, "do_rescale", False)), bool(getattr(ip, "do_normalize", False))
    if not (do_rescale or do_normalize):
        return None, f"{type(ip).__name__} neither rescales nor normalises"
    r = float(getattr(ip, "rescale_factor", 1 / 255)) if do_rescale else 1.0
    mean = _channels(getattr(ip, "image_mean", 0.0)) if do_normalize else [0.0, 0.0, 0.0]
    std = _channels(getattr(ip, "image_std", 1.0)) if do_normalize else [1.0, 1.0, 1.0]
    if len(mean) != len(std):
        return None, f"{type(ip).__name__}: image_mean and image_std differ in length"
    group = 0
    patch, temporal = getattr(ip, "patch_size", None), getattr(ip, "temporal_patch_size", None)
    if patch and temporal and getattr(ip, "merge_size", None):  # Qwen-VL: rows of flattened patches
        group = int(temporal) * int(patch) ** 2
    import torch

    if not do_normalize:
        return PixelTail((), (), group, scale=r), ""
    # The fused form the fast processors compute, in float32 as they do, so the result is the same bits.
    inv = 1.0 / r if do_rescale else 1.0
    shift = tuple((torch.tensor(mean) * inv).tolist())
    divisor = tuple((torch.tensor(std) * inv).tolist())
    return PixelTail(shift, divisor, group), ""


@contextlib.contextmanager
def without_tail(ip):
    """The processor with its rescale and normalise steps off (restored on exit)."""
    saved = (ip.do_rescale, ip.do_normalize)
    ip.do_rescale, ip.do_normalize = False, False
    try:
        yield ip
    finally:
        ip.do_rescale, ip.do_normalize = saved


def as_uint8(pixels):
    """Raw processor pixels (uint8, or a float tensor of whole numbers 0..255) as uint8."""
    import torch

    if pixels.dtype == torch.uint8:
        return pixels
    if pixels.is_floating_point() and bool(((pixels >= 0) & (pixels <= 255) & (pixels == pixels.round())).all()):
        return pixels.to(torch.uint8)
    raise ValueError("the processor's pixels before rescaling are not whole numbers in 0..255")


def _probes():
    from PIL import Image

    rng = np.random.default_rng(7)
    yield Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    gradient = np.linspace(0, 255, 480 * 640 * 3).reshape(480, 640, 3)
    yield Image.fromarray((gradient + rng.normal(0, 8, gradient.shape)).clip(0, 255).astype(np.uint8))
    yield Image.fromarray(rng.integers(0, 256, (300, 200), dtype=np.uint8), mode="L")
    yield Image.fromarray(rng.integers(0, 256, (96, 128, 4), dtype=np.uint8), mode="RGBA")


def check(model, prompt: str | None = None, task: str | None = None) -> dict:
    """Whether uint8 transport is exact for this model: {"transport": "uint8"|"float32", "reason", "max_abs_diff"},
    and for Qwen-VL patch rows whether they can cross as frames ({"layout": "frames"|"patches"}, pixel_layout.py).

    Runs ST's own `preprocess` on probe images, as it is and with the tail off (and frames shipped), and
    compares the processor's output with the tail applied to the uint8 pixels (unfolded into patches)."""
    import torch

    from mmembed.models.pixel_layout import FRAMES, PATCHES, frames_reason

    ip = image_processor(model)
    tail, why = tail_of(ip)
    if tail is None:
        return {"transport": "float32", "reason": why}
    kwargs = {"task": task} if task else {}
    worst = 0.0
    layout_why = frames_reason(ip) if tail.group else "images, not patch rows"
    frames_worst = 0.0
    try:
        for image in _probes():
            want = model.preprocess([image], prompt=prompt, **kwargs)
            with without_tail(ip):
                raw = model.preprocess([image], prompt=prompt, **kwargs)
            ref, got = want.get("pixel_values"), raw.get("pixel_values")
            if not isinstance(ref, torch.Tensor) or not isinstance(got, torch.Tensor):
                return {"transport": "float32", "reason": "the image features have no pixel_values tensor"}
            if ref.dtype != torch.float32 or ref.shape != got.shape:
                return {"transport": "float32", "reason": f"pixel_values are {ref.dtype} {tuple(ref.shape)}, raw "
                        f"{got.dtype} {tuple(got.shape)}: not the shape of a tail on uint8 pixels"}
            others = _changed(want, raw)
            if others:
                return {"transport": "float32", "reason": f"turning the tail off changes {others}"}
            worst = max(worst, float((tail.apply(as_uint8(got)) - ref).abs().max()))
            if layout_why is None:
                layout_why, diff = _frames_diff(model, ip, tail, image, want, prompt, kwargs)
                frames_worst = max(frames_worst, diff)
    except Exception as exc:  # noqa: BLE001 - any surprise keeps the exact float transport
        return {"transport": "float32", "reason": f"{type(exc).__name__}: {exc}"}
    if worst > TOLERANCE:
        return {"transport": "float32", "max_abs_diff": worst,
                "reason": f"the tail on uint8 pixels differs from the processor by {worst:.2e} (> {TOLERANCE:g})"}
    if layout_why is None and frames_worst > TOLERANCE:
        layout_why = f"frames unfolded on the device differ from the processor by {frames_worst:.2e}"
    if not tail.group:
        layout = {}  # images, not patch rows: nothing to unfold
    else:
        layout = {"layout": FRAMES} if layout_why is None else {"layout": PATCHES, "layout_reason": layout_why}
    return {"transport": "uint8", "max_abs_diff": max(worst, frames_worst), "processor": type(ip).__name__,
            "reason": "rescale and normalise run on the encoder's device", **layout}


def _changed(want: dict, got: dict) -> list[str]:
    """The tensors besides pixel_values that differ between two preprocess outputs."""
    import torch

    return [k for k in want if k != "pixel_values" and isinstance(want[k], torch.Tensor)
            and not torch.equal(want[k], got[k])]


def _frames_diff(model, ip, tail: PixelTail, image, want: dict, prompt, kwargs) -> tuple[str | None, float]:
    """(None, max |delta|) of frame rows unfolded and given the tail against ST's features for `image`, or
    (why frames do not serve this model, 0)."""
    import torch

    from mmembed.models.pixel_layout import release, ship_frames, unfold

    ship_frames(ip)
    try:
        with without_tail(ip):
            framed = model.preprocess([image], prompt=prompt, **kwargs)
    finally:
        release(ip, "patchify")
    grid = framed.get("image_grid_thw")
    if not isinstance(grid, torch.Tensor):
        return "the image features have no image_grid_thw", 0.0
    others = _changed(want, framed)
    if others:
        return f"shipping frames changes {others}", 0.0
    got = tail.apply(unfold(as_uint8(framed["pixel_values"]), grid, ip))
    if got.shape != want["pixel_values"].shape:
        return (f"unfolded frames are {tuple(got.shape)}, the processor's patches "
                f"{tuple(want['pixel_values'].shape)}", 0.0)
    return None, float((got - want["pixel_values"]).abs().max())
