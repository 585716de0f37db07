"""`mmembed rerank` on what `embed` takes beyond text and images: video, audio structs, chat messages.

ST's CrossEncoder takes a video (a path, or frames) as either side of a pair and a chat
conversation (roles `query`/`document`) as a whole input, not as one side of a pair. The tiny
Qwen3-VL reranker takes text, image, video and messages but no audio, so audio is tested up to
its refusal: before Ray starts when the input has it, else one error row per pair.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_job
from tests.test_audio_video import make_video
from tests.test_rerank import TOL, check_parity, rerank, write_candidates

PART = pa.struct([("type", pa.string()), ("text", pa.string()), ("video", pa.string())])
CONVERSATION = pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(PART))]))
AUDIO = pa.struct([("array", pa.list_(pa.float32())), ("sampling_rate", pa.int64())])


@pytest.mark.slow
def test_video_pairs_and_conversations_match_cross_encoder(ray_session, tiny_reranker, cross_encoders, tmp_path):
    """Videos as documents (alone, with text) and as a query, and `messages` conversations."""
    media = tmp_path / "cands" / "media"
    media.mkdir(parents=True)
    a = make_video(media / "a.mp4", seconds=2, fps=10)
    b = make_video(media / "b.mp4", seconds=3, fps=8, size=(64, 96), source="testsrc")
    docs = [  # (doc id, stored {text, video} cell, what CrossEncoder gets)
        ("v_rel", {"text": None, "video": "media/a.mp4"}, str(a)),
        ("v_abs", {"text": None, "video": str(b)}, str(b)),
        ("v_text", {"text": "a red car", "video": "media/a.mp4"}, {"text": "a red car", "video": str(a)}),
        ("text", {"text": "a small dog in the park", "video": None}, "a small dog in the park"),
    ]
    texts = [("t0", "a moving pattern"), ("t1", "the city at night")]

    def turn(role, *parts):
        return {"role": role, "content": [{"type": k, "text": v if k == "text" else None, "video": v if k == "video" else None}
                                          for k, v in parts]}  # fmt: skip

    conversations = {
        "c0": [turn("query", ("text", "a dog")), turn("document", ("video", str(a)), ("text", "a caption"))],
        "c1": [turn("system", ("text", "Judge videos.")), turn("query", ("text", "a dog")), turn("document", ("video", str(b)))],
        "c2": [turn("query", ("video", str(b))), turn("document", ("text", "a red car"))],
    }  # fmt: skip
    rows = [{"query_id": "tq", "query": "a dog", "doc_id": d, "doc": cell} for d, cell, _ in docs]
    rows += [{"query_id": "vq", "query": "media/b.mp4", "doc_id": d, "doc": {"text": t, "video": None}} for d, t in texts]
    rows += [{"query_id": "cq", "query": None, "doc_id": d, "doc": None, "messages": m} for d, m in conversations.items()]
    doc_type = pa.struct([("text", pa.string()), ("video", pa.string())])
    table = pa.table(
        {
            "query_id": [r["query_id"] for r in rows],
            "query": [r["query"] for r in rows],
            "doc_id": [r["doc_id"] for r in rows],
            "doc": pa.array([r["doc"] for r in rows], doc_type),
            "messages": pa.array([r.get("messages") for r in rows], CONVERSATION),
        }
    )
    cands = write_candidates(tmp_path / "cands", table)
    results, errors, manifest = rerank(tmp_path, cands, tiny_reranker)
    assert not errors and manifest["counts"]["written"] == len(rows)
    model = cross_encoders(tiny_reranker)
    expected = {"tq": ("a dog", [(d, ref) for d, _, ref in docs]), "vq": (str(b), texts)}
    worst = check_parity(model, results, expected)
    # Conversations: CrossEncoder.predict on each; CrossEncoder.rank builds pairs, so their ranks
    # are the score order (ties by doc id).
    reference = {d: float(model.predict([_st_conversation(m)])[0]) for d, m in conversations.items()}
    for rank, d in enumerate(sorted(reference, key=lambda d: (-reference[d], d)), 1):
        score, got_rank = results[("cq", d)]
        worst = max(worst, abs(score - reference[d]))
        assert got_rank == rank
    assert worst <= TOL, worst
    print(f"video/conversation max |diff| = {worst:.2e}")
    # The media reach the model: scores differ between documents.
    assert np.ptp([results[("tq", d)][0] for d, *_ in docs]) > 1e-3


def _st_conversation(messages: list) -> list:
    """The conversation as a user hands it to ST: parts without the other types' null fields."""
    return [{"role": m["role"], "content": [{"type": p["type"], p["type"]: p[p["type"]]} for p in m["content"]]}
            for m in messages]  # fmt: skip


def _refused(tmp_path, monkeypatch, capsys, table: pa.Table, model: str, *extra) -> str:
    import pipelines.rerank as rerank_job
    from mmembed.executors import cluster

    def no_ray(*_a, **_k):
        raise AssertionError("Ray must not start for a refused input")

    monkeypatch.setattr(cluster, "init_ray", no_ray)
    cands = write_candidates(tmp_path / "refused_cands", table)
    out = tmp_path / "refused"
    rc = rerank_job.main(["--candidates", str(cands), "--output", str(out), "--model", model, *map(str, extra)])
    assert rc == 2 and not out.exists()
    return capsys.readouterr().err


def _tone(seconds: float, rate: int, freq: float) -> list[float]:
    t = np.arange(int(seconds * rate), dtype=np.float32) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32).tolist()


def test_unsupported_modalities_and_side_messages_refused_before_ray(
    tiny_reranker, tiny_cross_encoder, tmp_path, monkeypatch, capsys
):
    audio_docs = pa.table(
        {
            "query_id": ["q", "q"],
            "query": ["a tone", "a tone"],
            "doc_id": ["a0", "a1"],
            "doc": pa.array([{"array": _tone(0.5, 16_000, 440), "sampling_rate": 16_000},
                             {"array": _tone(0.3, 48_000, 220), "sampling_rate": 48_000}], AUDIO),  # fmt: skip
        }
    )
    err = _refused(tmp_path, monkeypatch, capsys, audio_docs, tiny_reranker)
    assert "the candidates hold audio inputs" in err and "text, image, video, message" in err
    assert "--on-unsupported error-row" in err
    # A text cross-encoder is refused videos (ST would read a path as text for it).
    videos = pa.table({"query_id": ["q"], "query": ["a dog"], "doc_id": ["d"], "doc": ["clip.mp4"]})
    err = _refused(tmp_path, monkeypatch, capsys, videos, tiny_cross_encoder)
    assert "the candidates hold video inputs" in err
    # Messages as one side of a pair: CrossEncoder has no such input; the fix is a conversation.
    side_messages = pa.table(
        {
            "query_id": ["q"],
            "query": ["a dog"],
            "doc_id": ["d"],
            "doc": pa.array([[{"role": "user", "content": [{"type": "text", "text": "x", "video": None}]}]], CONVERSATION),
        }
    )
    err = _refused(tmp_path, monkeypatch, capsys, side_messages, tiny_reranker)
    assert "CrossEncoder takes chat messages only as a whole pair" in err and "`messages` column" in err


@pytest.mark.slow
def test_audio_structs_become_error_rows(ray_session, tiny_reranker, cross_encoders, tmp_path):
    """With --on-unsupported error-row, audio (a bare struct or a struct's audio field) is read and
    refused per pair with the reason; the other pairs are scored as CrossEncoder does."""
    doc_type = pa.struct([("text", pa.string()), ("audio", AUDIO)])
    cells = {
        "t0": {"text": "a red bird", "audio": None},
        "a_only": {"text": None, "audio": {"array": _tone(0.5, 16_000, 440), "sampling_rate": 16_000}},
        "a_text": {"text": "a tone", "audio": {"array": _tone(0.2, 48_000, 300), "sampling_rate": 48_000}},
        "t1": {"text": "blue sea", "audio": None},
    }
    table = pa.table(
        {
            "query_id": ["q"] * len(cells),
            "query": ["a sound"] * len(cells),
            "doc_id": list(cells),
            "doc": pa.array(list(cells.values()), doc_type),
        }
    )
    cands = write_candidates(tmp_path / "cands", table)
    assert run_job("pipelines.rerank", ["--candidates", cands, "--output", tmp_path / "no", "--model", tiny_reranker]) == 2
    results, errors, manifest = rerank(tmp_path, cands, tiny_reranker, "--on-unsupported", "error-row")
    assert set(errors) == {("q", "a_only"), ("q", "a_text")}
    for e in errors.values():
        assert e["stage"] == "preprocess"
        assert e["error"].startswith("doc: the model does not take audio input"), e["error"]
    check_parity(cross_encoders(tiny_reranker), results, {"q": ("a sound", [("t0", "a red bird"), ("t1", "blue sea")])})
    assert manifest["counts"] == {"records": 4, "written": 2, "errors": 2, "below_top_k": 0, "unaccounted": 0}
