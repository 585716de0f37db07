"""Multimodal records and the `messages` column, and --split-modalities for CLIP-style models.

A row with several modality cells is one input, as ST's ``{"text": ..., "video": ...}``; a
`messages` cell is one chat-message list, as ST's message input. Both need a model that
supports `message`; others get an up-front error, or one row per (id, modality) with
--split-modalities.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_job
from tests.helpers import decoded, image_bytes, max_abs_diff, read_output
from tests.test_audio_video import make_video

TOL = 1e-5

MESSAGE_TYPE = pa.list_(
    pa.struct(
        [
            ("role", pa.string()),
            (
                "content",
                pa.list_(
                    pa.struct(
                        [("type", pa.string()), ("text", pa.string()), ("image", pa.binary()), ("video", pa.string())]
                    )
                ),
            ),
        ]
    )
)


def _job(tmp_path, table: pa.Table, model: str, *extra) -> tuple[int, str]:
    src = tmp_path / "manifest.parquet"
    pq.write_table(table, src)
    out = tmp_path / "out"
    rc = run_job("pipelines.embed", ["--input", src, "--output", out, "--model", model, "--batch-size", 3, *extra])
    return rc, out


def _st(model: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model, device="cpu")


@pytest.mark.slow
def test_messages_and_multimodal_records_parity(ray_session, tiny_qwen3vl, tmp_path):
    clip_a = str(make_video(tmp_path / "a.mp4", seconds=2, fps=15))
    clip_b = str(make_video(tmp_path / "b.mp4", seconds=4, fps=8, size=(64, 96)))
    img = image_bytes(3, size=(80, 64))

    def part(kind, value):
        return {"type": kind, kind: value}

    conversations = {
        "m_video_text": [{"role": "user", "content": [part("video", clip_a), part("text", "a dog running")]}],
        "m_image": [
            {"role": "system", "content": [part("text", "Represent the image.")]},
            {"role": "user", "content": [part("image", img), part("text", "red car")]},
        ],
        "m_two_videos": [{"role": "user", "content": [part("video", clip_a), part("video", clip_b)]}],
    }
    records = {"r_text_video": ("a cat on a bridge", clip_b), "r_video": (None, clip_a), "r_text": ("hello world", None)}
    ids = list(conversations) + list(records)
    table = pa.table(
        {
            "id": ids,
            "messages": pa.array(list(conversations.values()) + [None] * len(records), MESSAGE_TYPE),
            "text": [None] * len(conversations) + [r[0] for r in records.values()],
            "video": [None] * len(conversations) + [r[1] for r in records.values()],
        }
    )
    rc, out = _job(tmp_path, table, tiny_qwen3vl, "--task", "document")
    assert rc == 0
    emb, errors, manifest = read_output(out)
    assert not errors and set(emb) == set(ids)
    assert manifest["counts"]["by_modality"] == {"message": 3, "text+video": 1, "video": 1, "text": 1}

    st = _st(tiny_qwen3vl)

    def st_message(conv):  # what a user hands ST: paths and PIL images in the parts
        return [
            {**m, "content": [{**p, "image": decoded(p["image"])} if p["type"] == "image" else p for p in m["content"]]}
            for m in conv
        ]

    inputs = {k: st_message(v) for k, v in conversations.items()}
    inputs["r_text_video"] = {"text": records["r_text_video"][0], "video": clip_b}
    inputs["r_video"] = clip_a
    inputs["r_text"] = "hello world"
    # One input per call: ST mixes up video metadata when one batch holds several input kinds.
    reference = np.stack([st.encode_document([inputs[i]])[0] for i in ids])
    assert max_abs_diff(emb, ids, reference) <= TOL
    assert np.abs(reference[0] - reference[4]).max() > 1e-2  # video+text differs from the video alone


def test_multimodal_records_need_message_support(tiny_clip, tmp_path):
    """CLIP cannot embed text and an image together: refused before Ray starts, with the fix."""
    import contextlib
    import io

    table = pa.table({"id": ["a", "b"], "text": ["a red car", "a cat"], "image": pa.array([image_bytes(1), None])})
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc, out = _job(tmp_path, table, tiny_clip)
    assert rc == 2 and not out.exists()
    assert "image+text" in err.getvalue() and "--split-modalities" in err.getvalue()

    conv = [{"role": "user", "content": [{"type": "text", "text": "hi", "image": None, "video": None}]}]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc, out = _job(tmp_path, pa.table({"id": ["m"], "messages": pa.array([conv], MESSAGE_TYPE)}), tiny_clip)
    assert rc == 2 and "message" in err.getvalue()


@pytest.mark.slow
def test_split_modalities_one_row_per_id_and_modality(ray_session, tiny_clip, tmp_path):
    imgs = {i: image_bytes(10 + i, size=(40 + 8 * i, 40)) for i in range(3)}
    table = pa.table(
        {
            "id": ["both0", "both1", "img2", "txt3"],
            "text": ["a red car", "a small dog", None, "mountains"],
            "image": pa.array([imgs[0], imgs[1], imgs[2], None]),
        }
    )
    rc, out = _job(tmp_path, table, tiny_clip, "--split-modalities")
    assert rc == 0
    emb, errors, manifest = read_output(out)
    expected = {"both0#text", "both0#image", "both1#text", "both1#image", "img2#image", "txt3#text"}
    assert not errors and set(emb) == expected
    assert manifest["counts"]["by_modality"] == {"text": 3, "image": 3}
    st = _st(tiny_clip)
    texts = ["both0#text", "both1#text", "txt3#text"]
    images = ["both0#image", "both1#image", "img2#image"]
    assert max_abs_diff(emb, texts, st.encode(["a red car", "a small dog", "mountains"])) <= TOL
    assert max_abs_diff(emb, images, st.encode([decoded(imgs[i]) for i in range(3)])) <= TOL


@pytest.mark.slow
def test_combination_past_the_upfront_sample_is_an_error_row(ray_session, tiny_clip, tmp_path):
    """The up-front check reads the first 1,000 rows; an image+text record at row 1,500 for CLIP is an
    error row naming the fixes, and every other record is embedded."""
    n, bad = 1_600, 1_500
    table = pa.table(
        {
            "id": [f"r{i:04d}" for i in range(n)],
            "text": [f"caption number {i}" for i in range(n)],
            "image": pa.array([image_bytes(5) if i == bad else None for i in range(n)], pa.binary()),
        }
    )
    rc, out = _job(tmp_path, table, tiny_clip, "--batch-size", 64)
    assert rc == 0
    emb, errors, manifest = read_output(out)
    assert set(errors) == {f"r{bad:04d}"} and len(emb) == n - 1
    reason = errors[f"r{bad:04d}"]["error"]
    assert "image+text" in reason and "--split-modalities" in reason and "message" in reason
    assert manifest["counts"]["written"] + manifest["counts"]["errors"] == n
