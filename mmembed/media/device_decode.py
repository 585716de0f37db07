"""--decode-on-device: JPEG photos decoded and preprocessed by the encoder, on its device.

CLIP-sized models on a GPU node are bound by the CPU pool's decode, which runs at a tenth of the
forward pass's rate (benchmarks/RESULTS.md, "GPU"). With this option the CPU pool only
fetches a photo's bytes and checks its header; the encoder decodes a batch, with nvImageCodec where
it is installed (`--device-decoder`: a batch split between the GPU's hardware JPEG engines and its
CUDA cores, `--hw-decode-share`) or torchvision's nvJPEG (`decode_jpeg(device="cuda")`, one decoder
per process), and hands the decoded tensors to the model's own image processor with `device=`, so
resizing, cropping and normalising are the processor's own
code, run on the GPU. On a CPU encoder the same code runs with device="cpu".

Only records a device decode reproduces go this way: baseline RGB JPEGs with no EXIF rotation,
within --max-image-pixels. Any other image (PNG, WebP, grey or CMYK JPEGs, progressive or rotated
ones) is decoded by the CPU pool as before, record by record.
"""

from __future__ import annotations

import io
import threading

import numpy as np

from mmembed.media.decode import EXIF_ORIENTATION

# The feature key of a row that holds a JPEG's bytes for the encoder to decode.
JPEG_KEY = "encoded_jpeg"
JPEG_MAGIC = b"\xff\xd8\xff"


def jpeg_for_device(data: bytes, *, max_pixels: int) -> bool:
    """True when the encoder may decode these bytes itself (reads the header only)."""
    if not data.startswith(JPEG_MAGIC):
        return False
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if img.format != "JPEG" or img.mode != "RGB" or w * h > max_pixels:
            return False
        if img.info.get("progressive") or img.info.get("progression"):
            return False
        return img.getexif().get(EXIF_ORIENTATION, 1) == 1
    except Exception:  # noqa: BLE001 - the CPU pool decodes it and names what is wrong
        return False


def encoded_row(data: bytes) -> dict:
    """A preprocessed row's feature cells holding the JPEG itself."""
    return {
        "feat_keys": [JPEG_KEY],
        "feat_dtypes": ["uint8"],
        "feat_shapes": [[len(data)]],
        "feat_data": [data],
        "feat_meta": "{}",
    }


def image_processor(model):
    """The image processor inside an ST model, or None."""
    for module in model:
        processor = getattr(module, "processor", None)
        found = getattr(processor, "image_processor", None)
        if found is not None:
            return found
    return None


DECODERS = ("nvimgcodec", "torchvision")
# --hw-decode-share's default: DALI's published A100 figures put the best split near 75% on the hardware
# engines; not yet measured on a card here (benchmarks/gpu.py --hw-shares).
HW_DECODE_SHARE = 0.75


def nvimgcodec_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("nvidia.nvimgcodec") is not None
    except ModuleNotFoundError:
        return False


def resolve_decoder(choice: str) -> str:
    """--device-decoder: auto is nvImageCodec where installed, else torchvision. ValueError when the one named
    is missing."""
    if choice == "auto":
        return "nvimgcodec" if nvimgcodec_installed() else "torchvision"
    if choice == "nvimgcodec" and not nvimgcodec_installed():
        raise ValueError("--device-decoder nvimgcodec: nvImageCodec is not installed; pip install "
                         "'mmembed[nvimgcodec-cu13]' (or -cu12, matching torch's CUDA), or use "
                         "--device-decoder torchvision")
    if choice not in DECODERS:
        raise ValueError(f"--device-decoder {choice!r} is not one of auto, {', '.join(DECODERS)}")
    return choice


class NvImageCodecJpegs:
    """Batches of JPEG bytes decoded by nvImageCodec into [3, H, W] uint8 tensors on `device`.

    On CUDA the batch is split between the hardware JPEG engines (`hw_share` of it, A100/H100/H200) and
    the CUDA cores, and ordered on the caller's current CUDA stream; on CPU its libjpeg-turbo backend
    decodes (what the tests check parity with). Fancy upsampling, as libjpeg-turbo's default, which
    torchvision and Pillow use for ST."""

    def __init__(self, device, hw_share: float = HW_DECODE_SHARE):
        from nvidia import nvimgcodec

        self.nvimgcodec = nvimgcodec
        self.device = device
        kind = nvimgcodec.BackendKind
        if getattr(device, "type", str(device)) == "cuda":
            index = device.index if getattr(device, "index", None) is not None else 0
            backends = [nvimgcodec.Backend(kind.HW_GPU_ONLY, load_hint=float(hw_share)),
                        nvimgcodec.Backend(kind.GPU_ONLY), nvimgcodec.Backend(kind.HYBRID_CPU_GPU)]
            self.decoder = nvimgcodec.Decoder(device_id=index, backends=backends, options=":fancy_upsampling=1")
        else:
            self.decoder = nvimgcodec.Decoder(device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                                              backends=[nvimgcodec.Backend(kind.CPU_ONLY)],
                                              options=":fancy_upsampling=1")

    def __call__(self, data: list[bytes]) -> list:
        import torch

        nv = self.nvimgcodec
        # Only JPEGs without an EXIF rotation reach here (jpeg_for_device); interleaved RGB, as torchvision decodes.
        params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.SRGB,
                                 sample_format=nv.SampleFormat.I_RGB)
        cuda = getattr(self.device, "type", str(self.device)) == "cuda"
        kwargs = {"cuda_stream": torch.cuda.current_stream(self.device).cuda_stream} if cuda else {}
        images = self.decoder.decode(data, params=params, **kwargs)
        out = []
        for i, image in enumerate(images):
            if image is None:
                raise ValueError(f"nvImageCodec could not decode JPEG {i} of the batch")
            hwc = torch.as_tensor(image, device=self.device) if cuda else torch.from_numpy(np.asarray(image.cpu()))
            out.append(hwc.permute(2, 0, 1))
        return out


class DeviceImageDecoder:
    """Decodes batches of JPEG bytes on a device into the features ST's preprocess builds for an image."""

    def __init__(self, model, decoder: str = "torchvision", hw_share: float = HW_DECODE_SHARE):
        import torch
        from PIL import Image

        self.torch = torch
        self.decoder = decoder
        self.hw_share = hw_share
        self._nvimgcodec = None  # made on first use, on the device the batches go to
        self.processor = image_processor(model)
        if self.processor is None:
            raise ValueError("the model has no image processor")
        # What ST's preprocess returns for an image besides the pixels (e.g. {"modality": "image"}).
        probe = model.preprocess([Image.new("RGB", (32, 24), (200, 120, 40))])
        tensors = sorted(k for k, v in probe.items() if isinstance(v, torch.Tensor))
        if tensors != ["pixel_values"]:
            raise ValueError(
                f"its image features are {tensors}; decoding on the device reproduces CLIP-style processors, "
                "whose only image tensor is pixel_values at a fixed size"
            )
        self.meta = {k: v for k, v in probe.items() if not isinstance(v, torch.Tensor)}
        # An encoder runs two calls at once on its threads; one decode at a time keeps nvJPEG's
        # state to one caller (the decode is short beside the forward pass it feeds).
        self._lock = threading.Lock()

    def check(self) -> None:
        """Raise unless the processor gives a decoded tensor the same pixels as ST gives the image."""
        from PIL import Image

        torch = self.torch
        rng = np.random.default_rng(0)
        img = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
        want = self.processor(images=[img], return_tensors="pt")["pixel_values"]
        tensor = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
        try:
            got = self.processor(images=[tensor], return_tensors="pt", device="cpu")["pixel_values"]
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"its image processor ({type(self.processor).__name__}) does not take tensors on a "
                             f"device: {type(exc).__name__}: {exc}") from None
        if got.shape != want.shape or float((got - want).abs().max()) > 1e-4:
            raise ValueError(f"its image processor ({type(self.processor).__name__}) gives a decoded tensor other "
                             "pixels than ST's image input")

    def __call__(self, encoded: list, device) -> dict:
        """Features for a batch of JPEGs (each a uint8 numpy view of the bytes), on `device`."""
        from torchvision.io import ImageReadMode, decode_jpeg

        torch = self.torch
        if self.decoder == "nvimgcodec":
            with self._lock:
                if self._nvimgcodec is None:
                    self._nvimgcodec = NvImageCodecJpegs(device, self.hw_share)
            # nvImageCodec's decoder takes concurrent batches itself; each is ordered on its caller's stream.
            images = self._nvimgcodec([bytes(memoryview(buf)) for buf in encoded])
            pixels = self.processor(images=images, return_tensors="pt", device=device)["pixel_values"]
            return {"pixel_values": pixels, **self.meta}
        data = [torch.from_numpy(np.array(buf, dtype=np.uint8, copy=True)) for buf in encoded]
        with self._lock:
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        pixels = self.processor(images=images, return_tensors="pt", device=device)["pixel_values"]
        return {"pixel_values": pixels, **self.meta}


def unsupported_reason(model) -> str | None:
    """Why --decode-on-device cannot serve this model, checked before Ray starts; None when it can."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return "torchvision is not installed (pip install 'mmembed[image]')"
    try:
        DeviceImageDecoder(model).check()
    except ValueError as exc:
        return str(exc)
    return None
