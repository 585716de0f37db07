"""Audio and video decoding with torchcodec, for the CPU preprocess pool.

Each decoder turns fetched bytes (or a manifest struct cell) into exactly what ST's processors
take, so `model.preprocess` sees the same inputs as `SentenceTransformer.encode` would:

- video: ``{"array": uint8 tensor [T, C, H, W], "video_metadata": {...}}``. Frame indices come
  from the model's own video processor (`sample_frames`, with its fps / num_frames / min / max
  settings as loaded, so ``--processor-kwargs '{"fps": 1}'`` changes them), and only those
  frames are decoded: torchcodec seeks to them. The processor is then told not to sample again
  (``do_sample_frames=False``); the metadata keeps the original indices and fps, which is what
  timestamp-aware processors such as Qwen3-VL's put into the prompt.
- audio: ``{"array": float32 mono [N], "sampling_rate": model rate}``. FFmpeg mixes down to mono
  and resamples while decoding, as transformers' ``load_audio`` does for the path or URL that ST is
  given (FFmpeg's stereo downmix is (L + R) / sqrt(2), not the channel mean).

torchcodec is imported lazily: it is an optional extra (``mmembed[audio]``/``mmembed[video]``)
and must match the installed torch, so a text/image deployment never needs it.
"""

from __future__ import annotations

import re
from functools import partial

import numpy as np

from mmembed.media.decode import DecodeError

_MISSING_TORCHCODEC = (
    "{modality} decoding needs torchcodec matching torch (0.14 with torch 2.14, 0.13 with torch 2.13) "
    "and FFmpeg: pip install 'mmembed[{modality}]'"
)


def _torchcodec(modality: str):
    try:
        import torchcodec.decoders as decoders
    except (ImportError, OSError, RuntimeError) as exc:
        raise DecodeError(f"{_MISSING_TORCHCODEC.format(modality=modality)} ({type(exc).__name__}: {exc})") from None
    return decoders


def _clean(exc: Exception) -> str:
    """torchcodec's message without its C++ location and bug-report boilerplate."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^\w+, [^,]+\.(?:cpp|h):\d+, ", "", first).strip()


# Substrings of torchcodec/FFmpeg errors, and what they mean for the person reading the error row.
_VIDEO_HINTS = (
    (("best video stream is unknown", "No valid stream", "not a video stream"),
     "no video stream FFmpeg can decode (no video track, or a codec this FFmpeg build does not support)"),
    (("Could not seek file to pts=0", "pts value in seconds is unknown"), "the video stream has no frames"),
    (("Failed to open input buffer",), "corrupt, truncated or not a media container"),
    (("Could not push packet", "decodeAVFrame", "Invalid data found"), "corrupt or truncated video data"),
)


def _video_error(exc: Exception) -> DecodeError:
    text = str(exc)
    for needles, hint in _VIDEO_HINTS:
        if any(n in text for n in needles):
            return DecodeError(f"undecodable video: {hint} ({_clean(exc)})")
    return DecodeError(f"undecodable video ({type(exc).__name__}: {_clean(exc)})")


# --------------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------------
class VideoSampler:
    """Frame indices exactly as the model's video processor would pick them.

    transformers' processors sample inside `preprocess` via `sample_frames(metadata, **kwargs)`,
    where kwargs are the processor's valid kwargs defaulted from its attributes. Calling the same
    method with the same kwargs reproduces its choice (and its errors) without decoding a frame.
    """

    # `preprocess` pops these before it builds the sampling function.
    _NOT_SAMPLING = {"input_data_format", "do_convert_rgb", "do_sample_frames", "device", "video_metadata"}

    def __init__(self, video_processor=None, overrides: dict | None = None):
        self.vp = video_processor
        overrides = dict(overrides or {})
        self.enabled = False
        self.kwargs: dict = {}
        if video_processor is not None and hasattr(video_processor, "sample_frames"):
            names = getattr(getattr(video_processor, "valid_kwargs", None), "__annotations__", {})
            kwargs = {k: getattr(video_processor, k, None) for k in names}
            kwargs.update(overrides)
            self.enabled = bool(kwargs.get("do_sample_frames", getattr(video_processor, "do_sample_frames", False)))
            self.kwargs = {k: v for k, v in kwargs.items() if k not in self._NOT_SAMPLING}

    @classmethod
    def for_model(cls, model) -> VideoSampler:
        module = model[0] if len(model) else None
        processor = getattr(module, "processor", None)
        vp = getattr(processor, "video_processor", None)
        overrides = {}
        merge = getattr(module, "_merge_processing_kwargs", None)
        if callable(merge):
            # Processing kwargs stored with the model apply at call time, on top of the processor's.
            overrides = dict((merge(None) or {}).get("video") or {})
        return cls(vp, overrides)

    def indices(self, metadata) -> list[int]:
        if not self.enabled:
            return list(range(metadata.total_num_frames))
        return [int(i) for i in self.vp.sample_frames(metadata=metadata, **self.kwargs)]


def decode_video(data: bytes | None = None, *, struct=None, row=None, sampler: VideoSampler | None = None) -> dict:
    """A video file's sampled frames and metadata, decoding only the sampled frames."""
    if struct is not None:
        raise DecodeError("video cells must be URIs/paths or bytes; struct video cells are not supported")
    if not data:
        raise DecodeError("zero-byte video")
    decoders = _torchcodec("video")
    from transformers.video_utils import VideoMetadata

    sampler = sampler or VideoSampler()
    try:
        # "exact" scans packet headers (no decoding) for the true frame count and an index to seek
        # with; it is also what transformers' own torchcodec loader uses, so counts agree with ST.
        # One FFmpeg thread: each preprocess actor owns about one CPU.
        decoder = decoders.VideoDecoder(data, seek_mode="exact", num_ffmpeg_threads=1)
        md = decoder.metadata
    except Exception as exc:  # noqa: BLE001 - any container/codec failure is this record's
        raise _video_error(exc) from None
    if not md.num_frames:
        raise DecodeError("undecodable video: the video stream has no frames")
    metadata = VideoMetadata(
        total_num_frames=md.num_frames,
        fps=md.average_fps,
        duration=md.duration_seconds,
        video_backend="torchcodec",
        height=md.height,
        width=md.width,
    )
    try:
        indices = sampler.indices(metadata)
    except ValueError as exc:
        raise DecodeError(f"frame sampling failed (check --processor-kwargs fps/num_frames): {exc}") from None
    if not indices:
        raise DecodeError("frame sampling picked no frames")
    try:
        frames = decoder.get_frames_at(indices=indices).data.contiguous()
    except Exception as exc:  # noqa: BLE001
        raise _video_error(exc) from None
    metadata.frames_indices = indices
    return {"array": frames, "video_metadata": dict(metadata)}


# --------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------
def decode_audio(data: bytes | None = None, *, struct=None, row=None, sampling_rate: int | None = None) -> dict:
    """Mono float32 samples at `sampling_rate` (the model's), from file bytes or an
    ``{"array", "sampling_rate"}`` struct (array 1-D, or [channels, samples])."""
    if struct is not None:
        return _audio_from_struct(struct, sampling_rate)
    if not data:
        raise DecodeError("zero-length audio file")
    decoders = _torchcodec("audio")
    try:
        # The call transformers' load_audio makes for ST: a mean of the channels would differ from it.
        samples = decoders.AudioDecoder(data, sample_rate=sampling_rate, num_channels=1).get_all_samples()
    except Exception as exc:  # noqa: BLE001
        msg = _clean(exc)
        if "No audio frames were decoded" in str(exc):
            raise DecodeError("zero-length audio: the file holds no audio samples") from None
        raise DecodeError(f"undecodable audio ({msg})") from None
    if samples.data.numel() == 0:
        raise DecodeError("zero-length audio: the file holds no audio samples")
    return {"array": samples.data[0].numpy(), "sampling_rate": int(samples.sample_rate)}


def _audio_from_struct(struct, sampling_rate: int | None) -> dict:
    if not isinstance(struct, dict) or struct.get("array") is None:
        raise DecodeError('audio struct cells need {"array": [...], "sampling_rate": int}')
    try:
        array = np.asarray(struct["array"], dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"audio struct array is not numeric: {exc}") from None
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim not in (1, 2) or array.size == 0:
        raise DecodeError(f"audio struct array must be non-empty 1-D or [channels, samples], got shape {array.shape}")
    source_rate = struct.get("sampling_rate")
    if source_rate is None:
        raise DecodeError("audio struct has no sampling_rate")
    source_rate = int(source_rate)
    target_rate = source_rate if sampling_rate is None else int(sampling_rate)
    if array.ndim == 1 and source_rate == target_rate:
        return {"array": array, "sampling_rate": source_rate}
    # ST cannot take these as a dict (feature extractors take mono at their own rate only; CLAP's
    # raises on another rate), so they embed as ST embeds the same samples in a file: mixed down
    # and resampled by FFmpeg, like file cells.
    return {"array": _ffmpeg_mono(array, source_rate, target_rate), "sampling_rate": target_rate}


def _ffmpeg_mono(array: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """FFmpeg's downmix and resampler, the ones file inputs go through, on in-memory samples.

    The samples take a lossless float round trip through WavPack (stored as 32-bit float), so
    the only changes are the downmix and the resampling themselves.
    """
    import torch

    _torchcodec("audio")
    from torchcodec.decoders import AudioDecoder
    from torchcodec.encoders import AudioEncoder

    try:
        samples = torch.from_numpy(np.ascontiguousarray(np.atleast_2d(array)))
        encoded = AudioEncoder(samples, sample_rate=source_rate).to_tensor("wv")
        out = AudioDecoder(encoded, sample_rate=target_rate, num_channels=1).get_all_samples().data
    except Exception as exc:  # noqa: BLE001
        raise DecodeError(f"audio downmix/resampling {source_rate} -> {target_rate} Hz failed ({_clean(exc)})") from None
    return out[0].numpy()


def model_sampling_rate(model) -> int | None:
    """The audio rate the model's feature extractor expects (None for models without audio)."""
    processor = getattr(model[0], "processor", None) if len(model) else None
    for candidate in (getattr(processor, "feature_extractor", None), processor):
        rate = getattr(candidate, "sampling_rate", None)
        if isinstance(rate, int):
            return rate
    return None


# --------------------------------------------------------------------------------------------
# Wiring into the preprocess stage
# --------------------------------------------------------------------------------------------
def default_decoders(model) -> dict:
    """The stage's `decoders` hook for a loaded (weightless) ST model.

    A modality the model cannot take is refused before any decoding (its records are error rows
    only under --on-unsupported error-row), instead of decoding media nobody will use.
    """
    decoders = {}
    for modality in ("audio", "video"):
        if not model.supports(modality):
            decoders[modality] = partial(_refuse, modality=modality, model=model)
    if model.supports("video"):
        decoders["video"] = partial(decode_video, sampler=VideoSampler.for_model(model))
    if model.supports("audio"):
        decoders["audio"] = partial(decode_audio, sampling_rate=model_sampling_rate(model))
    return decoders


def _refuse(data=None, *, struct=None, row=None, modality: str, model) -> None:
    supported = ", ".join(str(m) for m in model.modalities)
    raise DecodeError(f"the model does not take {modality} input (it supports: {supported})")


def _is_decoded_video(value) -> bool:
    return isinstance(value, dict) and "video_metadata" in value and "array" in value


def prepare_for_st(st_input):
    """(ST input, processing_kwargs) for one record holding decoded media.

    Decoded videos are already sampled, so the processor must not sample them again. Inside chat
    messages ST passes media straight to the processor, so there the decoded dicts are unwrapped
    into raw frames/samples and their metadata/sampling rate go in the per-call kwargs instead.
    """
    kwargs: dict = {}
    if _is_decoded_video(st_input) or (isinstance(st_input, dict) and _is_decoded_video(st_input.get("video"))):
        kwargs["video"] = {"do_sample_frames": False}
    elif isinstance(st_input, list):
        st_input = [_unwrap_message(m, kwargs) for m in st_input]
    return st_input, (kwargs or None)


def prepare_pair_for_st(pair: list):
    """(pair, processing_kwargs) for a CrossEncoder [query, doc] pair holding decoded media.

    ST turns a non-text pair into query/document messages itself, but passes each side's value
    into the message part as given, and the processor does not take decoded dicts there. So, as
    in messages, videos become their frames and audio its samples; the metadata (in pair order:
    query first) and sampling rate go in the per-call kwargs.
    """
    kwargs: dict = {}
    sides = []
    for value in pair:
        if isinstance(value, dict) and set(value) <= {"text", "image", "audio", "video"}:
            value = {kind: _unwrap(kind, v, kwargs) for kind, v in value.items()}
        else:
            value = _unwrap("video" if _is_decoded_video(value) else "audio", value, kwargs)
        sides.append(value)
    return sides, (kwargs or None)


def _unwrap(kind: str, value, kwargs: dict):
    """A decoded video/audio value as the processor takes it, its metadata/rate added to kwargs."""
    if kind == "video" and _is_decoded_video(value):
        video = kwargs.setdefault("video", {"do_sample_frames": False, "video_metadata": []})
        video["video_metadata"].append(value["video_metadata"])
        return value["array"]
    if kind == "audio" and isinstance(value, dict) and "sampling_rate" in value:
        rate = kwargs.setdefault("audio", {}).setdefault("sampling_rate", value["sampling_rate"])
        if rate != value["sampling_rate"]:
            raise DecodeError("an input mixes audio at different sampling rates")
        return value["array"]
    return value


def _unwrap_message(message: dict, kwargs: dict) -> dict:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = []
    for part in content:
        part = dict(part)
        kind = part.get("type")
        if kind in part:
            part[kind] = _unwrap(kind, part[kind], kwargs)
        parts.append(part)
    return {**message, "content": parts}
