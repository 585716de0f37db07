"""The tiny offline models must load with the real Sentence Transformers classes and run real inputs."""

from __future__ import annotations

import os

# Set before sentence_transformers / transformers are imported anywhere in this process: a stray hub
# lookup should fail fast instead of hanging on a machine without network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmembed.testing import (
    QWEN3VL_EMBEDDING_PROMPTS,
    TINY_MODEL_KINDS,
    build_tiny_cross_encoder,
    tiny_model,
)
from mmembed.testing import tiny_models as tiny_models_module

TEXTS = ["a photo of a cat", "a red car on the road", "music"]
SAMPLING_RATE = 48_000


def _image(seed: int, size: tuple[int, int] = (40, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8))


def _tone(freq: float = 440.0, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(SAMPLING_RATE * seconds)) / SAMPLING_RATE
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _assert_embeddings(embeddings, rows: int, dim: int) -> None:
    assert isinstance(embeddings, np.ndarray)
    assert embeddings.shape == (rows, dim)
    assert embeddings.dtype == np.float32
    assert np.isfinite(embeddings).all()


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


def _load(kind: str, root: Path):
    from sentence_transformers import CrossEncoder, SentenceTransformer

    path = tiny_model(kind, root)
    cls = CrossEncoder if kind in ("qwen3vl_reranker", "cross_encoder") else SentenceTransformer
    return cls(path, device="cpu", local_files_only=True)


@pytest.fixture(scope="module")
def clip(tiny_root):
    return _load("clip", tiny_root)


@pytest.fixture(scope="module")
def qwen_embedder(tiny_root):
    return _load("qwen3vl_embedder", tiny_root)


@pytest.fixture(scope="module")
def qwen_reranker(tiny_root):
    return _load("qwen3vl_reranker", tiny_root)


@pytest.fixture(scope="module")
def cross_encoder(tiny_root):
    return _load("cross_encoder", tiny_root)


@pytest.fixture(scope="module")
def clap(tiny_root):
    return _load("clap", tiny_root)


# --- building and caching -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TINY_MODEL_KINDS)
def test_build_is_small_and_deterministic(kind, tiny_root, tmp_path):
    cached = Path(tiny_model(kind, tiny_root))
    rebuilt = Path(tiny_models_module._BUILDERS[kind](tmp_path / kind))
    files = sorted(p.relative_to(cached) for p in cached.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(rebuilt) for p in rebuilt.rglob("*") if p.is_file())
    # The tiny ColQwen2 is shaped as the hub ships it: transformers files only, no ST modules.json.
    assert (Path("modules.json") in files or kind == "colqwen2") and Path("model.safetensors") in files
    for name in ("model.safetensors", "tokenizer.json"):
        assert (cached / name).read_bytes() == (rebuilt / name).read_bytes(), name
    assert sum((cached / f).stat().st_size for f in files) < 5 * 1024 * 1024


def test_tiny_model_reuses_existing_build(tiny_root, monkeypatch):
    first = tiny_model("cross_encoder", tiny_root)

    def fail(path):
        raise AssertionError("a cached tiny model must not be rebuilt")

    monkeypatch.setitem(tiny_models_module._BUILDERS, "cross_encoder", fail)
    assert tiny_model("cross_encoder", tiny_root) == first
    assert not [p for p in Path(tiny_root).iterdir() if p.name.startswith(".")], "staging dirs left behind"


def test_tiny_model_loser_of_a_race_keeps_the_winner(tmp_path, monkeypatch):
    # Simulate another process finishing first: the target appears while this build is running.
    def build_while_racing(path):
        build_tiny_cross_encoder(tmp_path / "cross_encoder")
        return build_tiny_cross_encoder(path)

    monkeypatch.setitem(tiny_models_module._BUILDERS, "cross_encoder", build_while_racing)
    target = tiny_model("cross_encoder", tmp_path)
    assert target == str(tmp_path / "cross_encoder")
    assert (Path(target) / "modules.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cross_encoder"]


def test_tiny_model_rejects_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="Unknown tiny model kind"):
        tiny_model("gpt5", tmp_path)


def test_builders_refuse_non_empty_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        build_tiny_cross_encoder(tmp_path)


# --- CLIP -----------------------------------------------------------------------------------------


def test_clip(clip):
    assert clip.modalities == ["text", "image"]
    text = clip.encode(TEXTS)
    images = clip.encode([_image(0), _image(1, size=(64, 48))])
    _assert_embeddings(text, 3, 16)
    _assert_embeddings(images, 2, 16)
    assert clip.get_embedding_dimension() == 16
    # Different inputs must give clearly different embeddings, or downstream parity tests are vacuous.
    assert not np.allclose(text[0], text[1], atol=1e-3)
    assert clip.similarity(text, images).shape == (3, 2)


# --- Qwen3-VL embedder ----------------------------------------------------------------------------


def test_qwen3vl_embedder_config(qwen_embedder):
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    assert set(qwen_embedder.modalities) >= {"text", "image", "video", "message"}
    assert [type(m) for m in qwen_embedder][1:] == [Pooling, Normalize]
    assert qwen_embedder[1].pooling_mode == "lasttoken"
    assert qwen_embedder.prompts["query"] == QWEN3VL_EMBEDDING_PROMPTS["query"]
    assert qwen_embedder.prompts["document"] == QWEN3VL_EMBEDDING_PROMPTS["document"]
    assert qwen_embedder.similarity_fn_name == "cosine"


def test_qwen3vl_embedder_encodes_every_modality(qwen_embedder):
    text = qwen_embedder.encode(TEXTS)
    images = qwen_embedder.encode([_image(0), _image(1, size=(80, 64))])
    records = qwen_embedder.encode(
        [{"text": "a cat on a mat", "image": _image(2)}, {"text": "a dog", "image": _image(3)}]
    )
    messages = qwen_embedder.encode(
        [[{"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "image", "image": _image(4)}]}]]
    )
    frames = [_image(10 + i, size=(64, 64)) for i in range(4)]
    video = qwen_embedder.encode([{"video": {"array": frames, "video_metadata": {"fps": 2.0, "total_num_frames": 4}}}])
    for embeddings, rows in ((text, 3), (images, 2), (records, 2), (messages, 1), (video, 1)):
        _assert_embeddings(embeddings, rows, 32)
        np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(text[0], text[1], atol=1e-3)


def test_qwen3vl_embedder_prompts_change_the_embedding(qwen_embedder):
    query = qwen_embedder.encode_query(["a cat"])
    document = qwen_embedder.encode_document(["a cat"])
    plain = qwen_embedder.encode(["a cat"])
    _assert_embeddings(query, 1, 32)
    assert not np.allclose(query, document, atol=1e-4)
    # Without a prompt the chat template falls back to the document instruction as system message.
    np.testing.assert_allclose(plain, document, atol=1e-5)


def test_qwen3vl_embedder_batch_padding_does_not_leak(qwen_embedder):
    alone = qwen_embedder.encode(["a"])
    batched = qwen_embedder.encode(["a", "a much longer text about a dog running in the green park"])
    np.testing.assert_allclose(alone[0], batched[0], atol=1e-4)


# --- Qwen3-VL reranker ----------------------------------------------------------------------------


def test_qwen3vl_reranker(qwen_reranker):
    from sentence_transformers.cross_encoder.modules import LogitScore

    assert set(qwen_reranker.modalities) >= {"text", "image", "message"}
    assert qwen_reranker[0].transformer_task == "any-to-any"
    assert qwen_reranker.tokenizer.padding_side == "left"
    logit_score = qwen_reranker[1]
    assert isinstance(logit_score, LogitScore)
    assert qwen_reranker.tokenizer.convert_ids_to_tokens([logit_score.true_token_id, logit_score.false_token_id]) == [
        "yes",
        "no",
    ]

    pairs = [("what is a cat", doc) for doc in TEXTS]
    scores = qwen_reranker.predict(pairs)
    assert scores.shape == (3,) and np.isfinite(scores).all()
    assert ((scores > 0) & (scores < 1)).all()  # sigmoid(logit_yes - logit_no)
    raw = qwen_reranker.predict(pairs, activation_fn=torch.nn.Identity())
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-raw)), atol=1e-5)
    assert np.ptp(raw) > 1e-3
    # A prompt becomes the system message, which the template renders as the <Instruct> line.
    instructed = qwen_reranker.predict(pairs[:1], prompt="Find documents about cats", activation_fn=torch.nn.Identity())
    assert not np.allclose(instructed, raw[:1], atol=1e-4)

    ranked = qwen_reranker.rank("what is a cat", TEXTS)
    assert sorted(r["corpus_id"] for r in ranked) == [0, 1, 2]
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)

    mixed = qwen_reranker.predict([("a cat", _image(0)), ("a cat", {"text": "a cat photo", "image": _image(1)})])
    assert mixed.shape == (2,) and np.isfinite(mixed).all()


# --- BERT cross-encoder ---------------------------------------------------------------------------


def test_cross_encoder(cross_encoder):
    assert cross_encoder.modalities == ["text"]
    assert cross_encoder.num_labels == 1
    raw = cross_encoder.predict([("what is a cat", doc) for doc in TEXTS], activation_fn=torch.nn.Identity())
    assert raw.shape == (3,) and np.isfinite(raw).all()
    assert np.ptp(raw) > 1e-3
    ranked = cross_encoder.rank("what is a cat", TEXTS, return_documents=True)
    assert sorted(r["corpus_id"] for r in ranked) == [0, 1, 2]
    assert all(r["text"] == TEXTS[r["corpus_id"]] for r in ranked)


# --- CLAP -----------------------------------------------------------------------------------------


def test_clap(clap):
    assert clap.modalities == ["text", "audio"]
    text = clap.encode(["a dog barking", "a sine tone"])
    audio = clap.encode(
        [
            {"array": _tone(440.0), "sampling_rate": SAMPLING_RATE},
            {"array": _tone(1000.0, seconds=0.5), "sampling_rate": SAMPLING_RATE},
        ]
    )
    _assert_embeddings(text, 2, 16)
    _assert_embeddings(audio, 2, 16)
    assert not np.allclose(audio[0], audio[1], atol=1e-3)
    # Clips up to the 2 s window are repeat-padded, never randomly cropped, so encoding is repeatable.
    again = clap.encode([{"array": _tone(440.0), "sampling_rate": SAMPLING_RATE}])
    np.testing.assert_allclose(again[0], audio[0], atol=1e-5)
    assert clap.similarity(text, audio).shape == (2, 2)
