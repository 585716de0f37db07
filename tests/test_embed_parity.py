"""Parity with SentenceTransformer.encode: the definition of done for correctness.

Every test runs the real pipeline (read -> CPU preprocess pool -> encoder pool -> Parquet) on
Ray and compares with ST on the same decoded inputs: max |diff| <= 1e-5 in fp32 on CPU.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sentence_transformers import SentenceTransformer

from tests.conftest import run_job
from tests.helpers import decoded, image_bytes, max_abs_diff, read_output

TOL = 1e-5


def _embed(tmp_path, manifest: pa.Table, model: str, *extra) -> tuple:
    src = tmp_path / "manifest.parquet"
    pq.write_table(manifest, src)
    out = tmp_path / "out"
    rc = run_job("pipelines.embed", ["--input", src, "--output", out, "--model", model, "--batch-size", 4, *extra])
    assert rc == 0
    return read_output(out)


def test_clip_text_and_image_parity(ray_session, tiny_clip, tmp_path):
    texts = ["a photo of a cat", "a red bicycle", "mountains at dawn with fog", "espresso"]
    imgs = [image_bytes(i, fmt="JPEG" if i % 2 else "PNG", size=(64 + 8 * i, 48)) for i in range(5)]
    mdir = tmp_path / "manifest"
    (mdir / "media").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    names = []
    for i, data in enumerate(imgs):
        name = f"img{i}.{'jpg' if i % 2 else 'png'}"
        # Relative paths resolve against the manifest's directory; absolute ones are used as-is.
        if i < 3:
            (mdir / "media" / name).write_bytes(data)
            names.append(f"media/{name}")
        else:
            (elsewhere / name).write_bytes(data)
            names.append(str(elsewhere / name))
    ids = [f"t{i}" for i in range(len(texts))] + [f"i{i}" for i in range(5)]
    table = pa.table(
        {"id": ids, "text": texts + [None] * 5, "image": pa.array([None] * len(texts) + names, pa.string())}
    )
    # Two manifest shards, so the read stage sees a directory of Parquet files.
    pq.write_table(table.slice(0, 6), mdir / "a.parquet")
    pq.write_table(table.slice(6), mdir / "b.parquet")
    out = tmp_path / "out"
    assert run_job("pipelines.embed", ["--input", mdir, "--output", out, "--model", tiny_clip, "--batch-size", 3]) == 0
    emb, errors, manifest = read_output(out)
    assert not errors
    assert set(emb) == set(table.column("id").to_pylist())

    st = SentenceTransformer(tiny_clip, device="cpu")
    ref_text = st.encode(texts, batch_size=4)
    ref_img = st.encode([decoded(b) for b in imgs], batch_size=4)
    assert max_abs_diff(emb, [f"t{i}" for i in range(len(texts))], ref_text) <= TOL
    assert max_abs_diff(emb, ["i0", "i1", "i2", "i3", "i4"], ref_img) <= TOL
    assert {k: manifest["counts"][k] for k in ("records", "written", "errors", "unaccounted", "by_modality")} == {
        "records": 9, "written": 9, "errors": 0, "unaccounted": 0, "by_modality": {"text": 4, "image": 5}
    }
    assert manifest["counts"]["duplicate_ids"] == 0
    assert manifest["model"]["dim"] == ref_text.shape[1]
    # Records must not have been mixed up: each of our vectors is nearest to its own record's ST vector.
    ours = np.stack([emb[i] for i in ["i0", "i1", "i2", "i3", "i4"]])
    dist = np.linalg.norm(ours[:, None, :] - ref_img[None, :, :], axis=2)
    assert (dist.argmin(axis=1) == np.arange(5)).all() and np.unique(ref_img, axis=0).shape[0] == 5


@pytest.mark.slow
def test_qwen3vl_text_image_and_record_parity(ray_session, tiny_qwen3vl, tmp_path):
    texts = ["what is in the chart?", "quarterly revenue grew", "a screenshot of a login form"]
    imgs = [image_bytes(10 + i, size=(56 + 28 * i, 56)) for i in range(3)]
    ids = ["t0", "t1", "t2", "i0", "i1", "r0", "r1"]
    manifest = pa.table(
        {
            "id": ids,
            "text": texts + [None, None, "caption for the first", "caption for the second one"],
            "image": pa.array([None, None, None, imgs[0], imgs[1], imgs[2], imgs[0]], pa.binary()),
        }
    )
    for task in ("document", "query"):
        run_dir = tmp_path / task
        run_dir.mkdir()
        emb, errors, m = _embed(run_dir, manifest, tiny_qwen3vl, "--task", task)
        assert not errors, errors
        st = SentenceTransformer(tiny_qwen3vl, device="cpu")
        enc = st.encode_document if task == "document" else st.encode_query
        inputs = texts + [decoded(imgs[0]), decoded(imgs[1])] + [
            {"text": "caption for the first", "image": decoded(imgs[2])},
            {"text": "caption for the second one", "image": decoded(imgs[0])},
        ]
        ref = enc(inputs, batch_size=4)
        assert max_abs_diff(emb, ids, ref) <= TOL, task
        assert m["model"]["task"] == task
        assert m["model"]["prompt"] == st.prompts[task]
        assert m["counts"]["by_modality"] == {"text": 3, "image": 2, "image+text": 2}
        assert m["model"]["pixels"]["layout"] == "frames"  # patchified on the encoder (pixel_layout.py)
    # The two tasks use different prompts, so they must differ.
    q, _, _ = read_output(tmp_path / "query" / "out")
    d, _, _ = read_output(tmp_path / "document" / "out")
    assert not np.allclose(q["t0"], d["t0"])


def test_minilm_parity_and_semantics(ray_session, minilm_path, tmp_path):
    from mmembed.testing.corpus import TOPICS

    ids, texts = [], []
    for topic, docs in TOPICS.items():
        for i, doc in enumerate(docs):
            ids.append(f"{topic}-{i}")
            texts.append(doc)
    emb, errors, m = _embed(tmp_path, pa.table({"id": ids, "text": texts}), minilm_path, "--task", "document")
    assert not errors
    st = SentenceTransformer(minilm_path, device="cpu")
    ref = st.encode_document(texts, batch_size=8)
    assert max_abs_diff(emb, ids, ref) <= TOL
    assert m["model"]["normalize"] is True  # MiniLM ends in a Normalize module

    q = st.encode_query(["how do I keep my sourdough starter alive?"])[0]
    mat = np.stack([emb[i] for i in ids])
    order = [ids[i] for i in np.argsort(-(mat @ q))]
    n_sourdough = len(TOPICS["sourdough"])
    top = order[:n_sourdough]
    # The sourdough documents rank above every other document except at most one.
    assert sum(t.startswith("sourdough") for t in top) >= n_sourdough - 1
    assert order[0].startswith("sourdough") and order[1].startswith("sourdough")


def test_precision_float16_and_normalize(ray_session, tiny_clip, tmp_path):
    texts = ["one", "two words", "three words here"]
    emb, errors, m = _embed(
        tmp_path, pa.table({"id": ["a", "b", "c"], "text": texts}), tiny_clip, "--precision", "float16", "--normalize"
    )
    out = pq.read_table(next((tmp_path / "out").glob("part-*.parquet")))
    assert out.schema.field("embedding").type == pa.list_(pa.float16(), m["model"]["dim"])
    ref = SentenceTransformer(tiny_clip, device="cpu").encode(texts, normalize_embeddings=True)
    assert max_abs_diff(emb, ["a", "b", "c"], ref) <= 1e-3  # float16 storage
    assert np.allclose(np.linalg.norm(np.stack(list(emb.values())).astype(np.float32), axis=1), 1.0, atol=1e-3)
