"""Audio and video: torchcodec decoding in the CPU pool, parity with ST, bad input as error rows.

Media are generated on the spot (ffmpeg CLI for videos, torchcodec's encoder for tones). The
references are ST itself loading the same files by path: for video, ST hands the path to
transformers' processor, which decodes and samples it; for audio, the processor reads the path with
transformers' load_audio (FFmpeg mixes down and resamples to the model's rate). The pipeline must
equal them to max |diff| <= 1e-5 in fp32 on CPU.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import run_job
from tests.helpers import max_abs_diff, read_output

TOL = 1e-5


# --------------------------------------------------------------------------------------------
# Generated media
# --------------------------------------------------------------------------------------------
def make_video(path: Path, *, seconds: float, fps: int, size=(96, 64), codec="libx264", source="testsrc2", extra=()):
    """A synthetic clip whose frames all differ (moving test pattern), written by the ffmpeg CLI."""
    cmd = [
        "ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", f"{source}=size={size[0]}x{size[1]}:rate={fps}:duration={seconds}",
        "-c:v", codec, *(["-pix_fmt", "yuv420p"] if codec == "libx264" else []), *extra, str(path),
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    return path


def make_tone(path: Path, *, seconds: float, rate: int, freq: float, channels: int = 1):
    """A sine tone (channels at slightly different pitches, so a wrong downmix shows)."""
    from torchcodec.encoders import AudioEncoder

    t = torch.arange(int(seconds * rate), dtype=torch.float32) / rate
    wave = torch.stack([0.4 * torch.sin(2 * torch.pi * (freq + 37 * c) * t) for c in range(channels)])
    AudioEncoder(wave, sample_rate=rate).to_file(str(path))
    return path


def float_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """[channels, N] float32 samples, unchanged, in a 32-bit float WAV (the ffmpeg CLI writes it)."""
    raw = path.with_suffix(".f32")
    np.ascontiguousarray(samples.T, dtype="<f4").tofile(raw)
    cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "f32le", "-ar", str(rate),
           "-ac", str(samples.shape[0]), "-i", str(raw), "-c:a", "pcm_f32le", str(path)]  # fmt: skip
    subprocess.run(cmd, check=True)
    return path


@pytest.fixture(scope="module")
def tiny_clap(models_root) -> str:
    from mmembed.testing import tiny_model

    return tiny_model("clap", models_root)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    return {
        "short": make_video(d / "short.mp4", seconds=1, fps=25),
        "mid": make_video(d / "mid.mp4", seconds=3, fps=10, size=(80, 80)),
        # Long enough that decoding every frame would be the dominant cost.
        "long": make_video(d / "long.mp4", seconds=40, fps=30, size=(64, 48)),
        "mkv": make_video(d / "odd.mkv", seconds=2.5, fps=12, size=(72, 56), codec="mpeg4"),
    }


def _embed(tmp_path: Path, table: pa.Table, model: str, *extra, expect_rc: int = 0):
    src = tmp_path / "manifest.parquet"
    pq.write_table(table, src)
    out = tmp_path / "out"
    rc = run_job(
        "pipelines.embed",
        ["--input", src, "--output", out, "--model", model, "--batch-size", 3, "--num-preprocessors", 1, *extra],
    )
    assert rc == expect_rc
    return read_output(out)


def _st(model: str, **kwargs):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model, device="cpu", **kwargs)


# --------------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------------
def test_decode_video_seeks_to_the_processor_frames(tiny_qwen3vl, videos, monkeypatch):
    """Only the frames the processor samples are decoded, by seeking, and they are the right ones."""
    import torchcodec.decoders
    from transformers.video_utils import VideoMetadata

    from mmembed.media.av import VideoSampler, decode_video

    calls = []
    original = torchcodec.decoders.VideoDecoder

    class Spy(original):
        def get_frames_at(self, indices):
            calls.append(("get_frames_at", list(indices)))
            return super().get_frames_at(indices)

        def get_frames_in_range(self, *a, **k):
            calls.append(("get_frames_in_range", a))
            return super().get_frames_in_range(*a, **k)

        def __getitem__(self, key):
            calls.append(("getitem", key))
            return super().__getitem__(key)

    monkeypatch.setattr(torchcodec.decoders, "VideoDecoder", Spy)
    st = _st(tiny_qwen3vl)
    vp = st[0].processor.video_processor
    data = videos["long"].read_bytes()
    out = decode_video(data=data, sampler=VideoSampler.for_model(st))

    full = original(data, seek_mode="exact")
    md = full.metadata
    meta = VideoMetadata(total_num_frames=md.num_frames, fps=md.average_fps)
    expected = [int(i) for i in vp.sample_frames(metadata=meta, num_frames=vp.num_frames, fps=vp.fps)]
    assert md.num_frames == 1200 and len(expected) == vp.max_frames == 4
    assert calls == [("get_frames_at", expected)], calls
    assert out["video_metadata"]["frames_indices"] == expected
    assert out["video_metadata"]["total_num_frames"] == 1200 and out["video_metadata"]["fps"] == 30
    assert out["array"].dtype == torch.uint8 and tuple(out["array"].shape) == (4, 3, 48, 64)
    # The seeked frames are bit-identical to those of a full sequential decode.
    for k, idx in enumerate(expected):
        assert torch.equal(out["array"][k], full[idx])


@pytest.mark.slow
def test_video_parity_with_st(ray_session, tiny_qwen3vl, videos, tmp_path):
    names = ["short", "mid", "long", "mkv"]
    table = pa.table({"id": names, "video": [str(videos[n]) for n in names]})
    emb, errors, manifest = _embed(tmp_path, table, tiny_qwen3vl)
    assert not errors and set(emb) == set(names)
    assert manifest["counts"]["by_modality"] == {"video": 4}
    st = _st(tiny_qwen3vl)
    # ST decodes and samples each path itself (transformers' processor, torchcodec backend).
    reference = np.stack([st.encode([str(videos[n])])[0] for n in names])
    assert max_abs_diff(emb, names, reference) <= TOL
    # Different clips give clearly different vectors (the test can fail on mixed-up inputs).
    assert np.abs(reference[0] - reference[2]).max() > 1e-2


@pytest.mark.slow
def test_processor_kwargs_control_frame_sampling(ray_session, tiny_qwen3vl, videos, tmp_path):
    """--processor-kwargs reaches the sampler: fps=1 on a 3 s clip samples 3 frames, not 4."""
    kwargs = {"fps": 1, "max_frames": 8}
    names = ["mid", "long"]
    table = pa.table({"id": names, "video": pa.array([videos[n].read_bytes() for n in names], pa.binary())})
    emb, errors, _ = _embed(tmp_path, table, tiny_qwen3vl, "--processor-kwargs", '{"fps": 1, "max_frames": 8}')
    assert not errors
    st = _st(tiny_qwen3vl, processor_kwargs=kwargs)
    reference = np.stack([st.encode([str(videos[n])])[0] for n in names])
    assert max_abs_diff(emb, names, reference) <= TOL
    default = _st(tiny_qwen3vl).encode([str(videos["mid"])])[0]
    assert np.abs(default - emb["mid"]).max() > 1e-3  # the option changed the result


# --------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tones")
    return {
        "stereo48": make_tone(d / "a.wav", seconds=1.5, rate=48_000, freq=440, channels=2),
        "stereo44": make_tone(d / "b.wav", seconds=1.5, rate=44_100, freq=470, channels=2),
        "mono16": make_tone(d / "c.wav", seconds=1.0, rate=16_000, freq=250),
        "mono44": make_tone(d / "d.wav", seconds=0.8, rate=44_100, freq=330),
        "mono48": make_tone(d / "e.wav", seconds=0.7, rate=48_000, freq=250),
        "mono22": make_tone(d / "f.flac", seconds=2.0, rate=22_050, freq=660),
        "mp3": make_tone(d / "g.mp3", seconds=1.2, rate=32_000, freq=520, channels=2),
        "movie": make_movie(d / "h.mp4"),
    }


def st_on_audio(st, path: Path) -> np.ndarray:
    """ST `encode` on an audio file's path. A video's path ST takes for a video (or, with an audio
    model, for text), so its audio track is given as ST loads any audio path: transformers'
    `load_audio` at the model's rate, handed over as {array, sampling_rate}."""
    if path.suffix != ".mp4":
        return st.encode([str(path)])[0]
    from transformers.audio_utils import load_audio

    rate = st[0].processor.feature_extractor.sampling_rate
    return st.encode([{"array": load_audio(str(path), sampling_rate=rate), "sampling_rate": rate}])[0]


def make_movie(path: Path) -> Path:
    """A video with a stereo AAC track at 44.1 kHz (channels at different pitches), as a phone films."""
    tone = "sine=frequency={}:sample_rate=44100:duration=1.5"
    cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=1.5",
           "-f", "lavfi", "-i", tone.format(440), "-f", "lavfi", "-i", tone.format(587),
           "-filter_complex", "[1:a][2:a]join=inputs=2:channel_layout=stereo[a]", "-map", "0:v", "-map", "[a]",
           "-c:v", "mpeg4", "-c:a", "aac", str(path)]  # fmt: skip
    subprocess.run(cmd, check=True)
    return path


@pytest.mark.slow
def test_audio_bytes_equal_st_on_the_same_paths(ray_session, tiny_clap, tones, tmp_path):
    """Audio cells as bytes (a video's audio track among them): resampled to 48 kHz and mixed down to
    mono as ST does with the file's path."""
    from torchcodec.decoders import AudioDecoder

    ids = list(tones)
    table = pa.table({"id": ids + ["t0"], "audio": [tones[i].read_bytes() for i in ids] + [None],
                      "text": [None] * len(ids) + ["a sine tone"]})  # fmt: skip
    emb, errors, manifest = _embed(tmp_path, table, tiny_clap, "--executor", "local")
    assert not errors and set(emb) == set(ids) | {"t0"}
    st = _st(tiny_clap)
    reference = np.stack([st_on_audio(st, tones[i]) for i in ids])
    assert max_abs_diff(emb, ids, reference) <= TOL
    assert max_abs_diff(emb, ["mono16", "mono44", "mono48"], reference[2:5]) <= 1e-6
    assert max_abs_diff(emb, ["t0"], st.encode(["a sine tone"])) <= TOL
    assert np.abs(reference[0] - reference[1]).max() > 1e-3
    # The mean of the channels (what ST does with an AudioDecoder object) is not what it does with a
    # path, so this test sees a wrong downmix.
    mean = st.encode([AudioDecoder(str(tones["stereo48"]), sample_rate=48_000)])[0]
    assert np.abs(mean - reference[0]).max() > 1e-3


def test_hugging_face_audio_feature_equals_st(tiny_clap, tones, tmp_path):
    """datasets' Audio feature, struct<bytes, path>: bytes (stereo and mono) and a path alone equal ST on the path."""
    cells = [{"bytes": tones["stereo48"].read_bytes(), "path": "a.wav"}, {"bytes": None, "path": str(tones["mono16"])},
             {"bytes": tones["mp3"].read_bytes(), "path": None}]
    table = pa.table({"id": ["s48", "m16", "mp3"],
                      "audio": pa.array(cells, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))})
    emb, errors, _ = _embed(tmp_path, table, tiny_clap, "--executor", "local")
    assert not errors
    st = _st(tiny_clap)
    reference = np.stack([st.encode([str(tones[k])])[0] for k in ("stereo48", "mono16", "mp3")])
    assert max_abs_diff(emb, ["s48", "m16", "mp3"], reference) <= TOL


@pytest.mark.slow
def test_audio_paths_and_urls_equal_st_on_the_same_paths(ray_session, tiny_clap, tones, tmp_path):
    from tests.helpers import media_server

    names = ["stereo48", "stereo44", "mono16", "mono44", "mono48", "movie"]
    payloads = {f"/{n}{tones[n].suffix}": tones[n].read_bytes() for n in names}
    with media_server(payloads) as base:
        ids = [f"{n}.path" for n in names] + [f"{n}.url" for n in names]
        cells = [str(tones[n]) for n in names] + [f"{base}/{n}{tones[n].suffix}" for n in names]
        table = pa.table({"id": ids, "audio": cells})
        emb, errors, _ = _embed(tmp_path, table, tiny_clap, "--executor", "local", "--allow-http")
    assert not errors and set(emb) == set(ids)
    st = _st(tiny_clap)
    reference = np.stack([st_on_audio(st, tones[n]) for n in names])
    assert max_abs_diff(emb, [f"{n}.path" for n in names], reference) <= TOL
    assert max_abs_diff(emb, [f"{n}.url" for n in names], reference) <= TOL


@pytest.mark.slow
def test_audio_struct_column(ray_session, tiny_clap, tmp_path):
    """{"array", "sampling_rate"} struct cells: mono at the model rate as given (as ST takes the same
    dict); other rates and channel counts, which ST's CLAP feature extractor refuses in a dict, as
    ST embeds the same samples in a file: mixed down and resampled by FFmpeg."""
    rates = {"s48": 48_000, "s44": 44_100, "m48": 48_000, "m16": 16_000}
    arrays = {}
    for name, rate in rates.items():
        t = np.arange(int(1.5 * rate), dtype=np.float32) / rate
        channels = 2 if name.startswith("s") else 1
        arrays[name] = np.stack([(0.3 - 0.1 * c) * np.sin(2 * np.pi * (800 - 300 * c) * t)
                                 for c in range(channels)]).astype(np.float32)  # fmt: skip
    # One Arrow type per column: [channels, samples], so mono cells are [1, N].
    cell = pa.struct([("array", pa.list_(pa.list_(pa.float32()))), ("sampling_rate", pa.int64())])
    cells = [{"array": arrays[n].tolist(), "sampling_rate": rates[n]} for n in rates]
    table = pa.table({"id": list(rates), "audio": pa.array(cells, cell)})
    emb, errors, _ = _embed(tmp_path, table, tiny_clap, "--executor", "local")
    assert not errors
    st = _st(tiny_clap)
    assert max_abs_diff(emb, ["m48"], st.encode([{"array": arrays["m48"][0], "sampling_rate": 48_000}])) <= 1e-6
    for name in ("s48", "s44", "m16"):
        path = float_wav(tmp_path / f"{name}.wav", arrays[name], rates[name])
        assert max_abs_diff(emb, [name], st.encode([str(path)])) <= TOL, name


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bad_videos_become_error_rows(ray_session, tiny_qwen3vl, videos, tmp_path):
    good = videos["mid"].read_bytes()
    d = tmp_path / "bad"
    d.mkdir()
    faststart = make_video(d / "fs.mp4", seconds=3, fps=10, extra=("-movflags", "+faststart")).read_bytes()
    no_frames = make_video(d / "nf.avi", seconds=3, fps=10, codec="mpeg4", extra=("-frames:v", "0")).read_bytes()
    audio_only = d / "ao.mp4"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "sine=duration=1",
                    "-c:a", "aac", str(audio_only)], check=True)  # fmt: skip
    stsd = good.find(b"stsd")
    fourcc = good.find(b"avc1", stsd)
    unknown_codec = good[:fourcc] + b"zzzz" + good[fourcc + 4 :]
    rng = np.random.default_rng(0)
    cells = {
        "good": good,
        "truncated": good[: len(good) // 3],  # index at the end: the container does not open
        "truncated_data": faststart[:3000],  # index first: frames are missing
        "garbage": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "no_frames": no_frames,
        "audio_only": audio_only.read_bytes(),
        "unknown_codec": unknown_codec,
    }
    table = pa.table({"id": list(cells), "video": pa.array(list(cells.values()), pa.binary())})
    emb, errors, manifest = _embed(tmp_path, table, tiny_qwen3vl)
    assert set(emb) == {"good"}
    assert set(errors) == set(cells) - {"good"}
    assert all(e["stage"] == "preprocess" and e["error"].startswith("undecodable video") for e in errors.values())
    assert "truncated" in errors["truncated"]["error"] and "truncated" in errors["truncated_data"]["error"]
    assert "no frames" in errors["no_frames"]["error"]
    assert "codec" in errors["unknown_codec"]["error"] and "codec" in errors["audio_only"]["error"]
    assert manifest["counts"]["unaccounted"] == 0
    st = _st(tiny_qwen3vl)
    assert max_abs_diff(emb, ["good"], st.encode([str(videos["mid"])])) <= TOL


@pytest.mark.slow
def test_bad_audio_and_incompatible_records_become_error_rows(ray_session, tiny_clap, tmp_path):
    d = tmp_path / "media"
    d.mkdir()
    good = make_tone(d / "ok.wav", seconds=1.0, rate=48_000, freq=440)
    (d / "zero.wav").write_bytes(b"")
    header_only = d / "empty.wav"  # a valid WAV header and no samples
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "sine=duration=1",
                    "-t", "0", str(header_only)], check=True)  # fmt: skip
    (d / "junk.mp3").write_bytes(b"ID3" + bytes(range(256)) * 8)
    rows = [
        ("ok", str(good), None),
        ("zero_length_file", str(d / "zero.wav"), None),
        ("no_samples", str(header_only), None),
        ("corrupt", str(d / "junk.mp3"), None),
        ("missing", str(d / "nope.wav"), None),
        # CLAP embeds text and audio, but not both in one input (it has no `message` support).
        ("audio_and_text", str(good), "a tone"),
    ]
    table = pa.table({"id": [r[0] for r in rows], "audio": [r[1] for r in rows], "text": [r[2] for r in rows]})
    # The up-front check refuses the multimodal record before Ray starts ...
    src = tmp_path / "m.parquet"
    pq.write_table(table, src)
    assert run_job("pipelines.embed", ["--input", src, "--output", tmp_path / "refused", "--model", tiny_clap]) == 2
    assert not (tmp_path / "refused").exists()
    # ... and with --on-unsupported error-row it becomes an error row while the rest goes on.
    emb, errors, manifest = _embed(tmp_path, table, tiny_clap, "--on-unsupported", "error-row")
    assert set(emb) == {"ok"}
    assert set(errors) == {r[0] for r in rows} - {"ok"}
    assert "zero-byte" in errors["zero_length_file"]["error"]
    assert "zero-length" in errors["no_samples"]["error"]
    assert "undecodable audio" in errors["corrupt"]["error"]
    assert "does not support audio+text" in errors["audio_and_text"]["error"]
    assert manifest["counts"]["unaccounted"] == 0
