"""`mmembed search`: exact streaming top-k equals brute force over a corpus of several shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_job


def write_embeddings(out: Path, ids: list[str], vectors: np.ndarray, shards: int, similarity: str) -> Path:
    """An embed-job output (part shards + _manifest.json) holding the given vectors."""
    out.mkdir(parents=True)
    dim = vectors.shape[1]
    files = []
    for i, idx in enumerate(np.array_split(np.arange(len(ids)), shards)):
        flat = pa.array(vectors[idx].reshape(-1), pa.float32())
        table = pa.table(
            {
                "id": [ids[j] for j in idx],
                "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
                "modality": ["text"] * len(idx),
            }
        )
        name = f"part-test-{i:04d}.parquet"
        pq.write_table(table, out / name)
        files.append({"name": name, "rows": len(idx)})
    manifest = {
        "status": "complete",
        "job": "embed",
        "model": {"name": "synthetic", "revision": "r1", "dim": dim, "normalize": False, "normalize_flag": False,
                  "similarity_fn_name": similarity, "truncate_dim": None},
        "counts": {"records": len(ids), "written": len(ids), "errors": 0},
        "files": files,
        "error_files": [],
    }
    (out / "_manifest.json").write_text(json.dumps(manifest))
    return out


def read_search(out: Path) -> tuple[dict, dict, dict]:
    """({query_id: [(doc_id, score, rank), ...] by rank}, {query_id: error row}, manifest)."""
    results: dict = {}
    for p in sorted(out.glob("part-*.parquet")):
        for r in pq.read_table(p).to_pylist():
            results.setdefault(r["query_id"], []).append((r["doc_id"], r["score"], r["rank"]))
    errors = {}
    for p in sorted((out / "_errors").glob("errors-*.parquet")):
        for r in pq.read_table(p).to_pylist():
            errors[r["id"]] = r
    return {q: sorted(v, key=lambda x: x[2]) for q, v in results.items()}, errors, json.loads(
        (out / "_manifest.json").read_text()
    )


def brute_force(queries: np.ndarray, corpus: np.ndarray, similarity: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    q, c = queries.astype(np.float64), corpus.astype(np.float64)
    if similarity == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        c = c / np.linalg.norm(c, axis=1, keepdims=True)
    scores = q @ c.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def assert_matches_brute_force(results, qids, doc_ids, order, scores):
    for i, qid in enumerate(qids):
        got = results[qid]
        assert [d for d, _, _ in got] == [doc_ids[j] for j in order[i]], qid
        assert [r for _, _, r in got] == list(range(1, len(got) + 1))
        np.testing.assert_allclose([s for _, s, _ in got], scores[i], atol=1e-5, rtol=0)


def synthetic_search_inputs(tmp_path: Path, similarity: str, seed: int):
    """230 random 24-d corpus vectors in 5 shards and 9 queries in 2, as embed outputs."""
    rng = np.random.default_rng(seed)
    corpus = rng.normal(size=(230, 24)).astype(np.float32)
    queries = rng.normal(size=(9, 24)).astype(np.float32)
    doc_ids = [f"doc-{i:04d}" for i in range(len(corpus))]
    qids = [f"q{i}" for i in range(len(queries))]
    cdir = write_embeddings(tmp_path / "corpus", doc_ids, corpus, shards=5, similarity=similarity)
    qdir = write_embeddings(tmp_path / "queries", qids, queries, shards=2, similarity=similarity)
    return corpus, queries, doc_ids, qids, cdir, qdir


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_search_equals_brute_force_over_shards(ray_session, tmp_path, similarity):
    corpus, queries, doc_ids, qids, cdir, qdir = synthetic_search_inputs(tmp_path, similarity, seed=7)
    out = tmp_path / "out"
    k = 12
    rc = run_job(
        "pipelines.search",
        # Blocks of 37 rows never align with the 46-row shards; queries come 4 at a time.
        ["--queries", qdir, "--corpus-embeddings", cdir, "--output", out, "--top-k", k,
         "--corpus-block-rows", 37, "--query-batch-size", 4],
    )
    assert rc == 0
    results, errors, manifest = read_search(out)
    assert not errors and set(results) == set(qids)
    order, scores = brute_force(queries, corpus, similarity, k)
    assert_matches_brute_force(results, qids, doc_ids, order, scores)
    assert manifest["model"]["similarity_fn_name"] == similarity
    assert manifest["counts"]["written"] == len(qids) * k and manifest["counts"]["unaccounted"] == 0


@pytest.mark.slow
def test_search_embeds_raw_queries_with_minilm(ray_session, minilm_path, tmp_path):
    """Raw query records are embedded as encode_query would, then searched; bad queries are error rows."""
    from sentence_transformers import SentenceTransformer

    from mmembed.testing.corpus import make_corpus

    corpus = make_corpus(tmp_path / "demo", photos=0, screenshots=0)
    cdir = tmp_path / "corpus-emb"
    assert run_job(
        "pipelines.embed",
        ["--input", corpus["texts"], "--output", cdir, "--model", minilm_path, "--task", "document",
         "--shard-rows", 5],
    ) == 0
    assert len(list(cdir.glob("part-*.parquet"))) >= 3
    qtexts = ["how do I keep my sourdough starter alive?", "best time to see the milky way", "fix my bike chain"]
    qpath = tmp_path / "queries.parquet"
    pq.write_table(pa.table({"id": ["sour", "stars", "bike", "blank"], "text": qtexts + ["   "]}), qpath)
    out = tmp_path / "out"
    k = 4
    assert run_job(
        "pipelines.search",
        ["--queries", qpath, "--corpus-embeddings", cdir, "--output", out, "--top-k", k, "--model", minilm_path,
         "--corpus-block-rows", 4],
    ) == 0
    results, errors, manifest = read_search(out)
    assert set(errors) == {"blank"} and "empty text" in errors["blank"]["error"]
    texts = pq.read_table(corpus["texts"]).to_pydict()
    model = SentenceTransformer(minilm_path, device="cpu")
    order, scores = brute_force(
        model.encode_query(qtexts), model.encode_document(texts["text"]), model.similarity_fn_name, k
    )
    assert_matches_brute_force(results, ["sour", "stars", "bike"], texts["id"], order, scores)
    assert all(d.startswith("sourdough-") for d, _, _ in results["sour"])
    assert results["stars"][0][0].startswith("astronomy-") and results["bike"][0][0].startswith("cycling-")
    assert manifest["counts"]["records"] == 4 and manifest["counts"]["unaccounted"] == 0


def test_search_refuses_mismatched_inputs_before_ray(tmp_path, capsys, monkeypatch):
    import pipelines.search as search_job
    from mmembed.executors import cluster

    def no_ray(*_a, **_k):
        raise AssertionError("Ray must not start for refused inputs")

    monkeypatch.setattr(cluster, "init_ray", no_ray)
    rng = np.random.default_rng(0)
    cdir = write_embeddings(tmp_path / "corpus", ["a", "b"], rng.normal(size=(2, 4)), 1, "cosine")
    raw = tmp_path / "q.parquet"
    pq.write_table(pa.table({"id": ["q"], "text": ["hello"]}), raw)
    rc = search_job.main(["--queries", str(raw), "--corpus-embeddings", str(cdir), "--output", str(tmp_path / "o"),
                          "--top-k", "1"])
    assert rc == 2 and "pass --model synthetic" in capsys.readouterr().err
    rc = search_job.main(["--queries", str(raw), "--corpus-embeddings", str(tmp_path / "nope"), "--output",
                          str(tmp_path / "o"), "--top-k", "1"])
    assert rc == 2 and "not a finished `mmembed embed` output" in capsys.readouterr().err


def test_search_passes_fetch_options_to_the_query_embedding():
    """--max-bytes, --fetch-threads, --http-timeout and --allow-http of search reach the embed job of its queries."""
    from mmembed import cli
    from mmembed.jobs.search import query_embed_config

    cfg = cli.parse("search", ["--queries", "q", "--corpus-embeddings", "c", "--output", "o", "--top-k", "1",
                               "--max-bytes", "123", "--fetch-threads", "3", "--http-timeout", "1.5", "--allow-http",
                               "--model", "m"])
    embed_cfg = query_embed_config(cfg, {"normalize_flag": True})
    assert (embed_cfg.max_bytes, embed_cfg.fetch_threads, embed_cfg.http_timeout, embed_cfg.allow_http) == (
        123, 3, 1.5, True)
    assert (embed_cfg.input, embed_cfg.model, embed_cfg.task, embed_cfg.normalize) == ("q", "m", "query", True)


@pytest.mark.slow
def test_search_query_media_obey_max_bytes_and_http_timeout(ray_session, tiny_clip, tmp_path):
    """Query images go through the embed job's fetch limits: one over --max-bytes and one slower than
    --http-timeout become error rows with those reasons; the other query is searched."""
    from PIL import Image
    from sentence_transformers import SentenceTransformer

    from tests.helpers import image_bytes, media_server

    st = SentenceTransformer(tiny_clip, device="cpu")
    rng = np.random.default_rng(3)
    corpus = rng.normal(size=(20, st.get_embedding_dimension())).astype(np.float32)
    doc_ids = [f"d{i:02d}" for i in range(len(corpus))]
    cdir = write_embeddings(tmp_path / "corpus", doc_ids, corpus, shards=2, similarity="cosine")
    manifest = json.loads((cdir / "_manifest.json").read_text())
    manifest["model"]["name"] = tiny_clip
    (cdir / "_manifest.json").write_text(json.dumps(manifest))
    small, big = image_bytes(1), image_bytes(2, size=(300, 300))
    (tmp_path / "small.png").write_bytes(small)
    (tmp_path / "big.png").write_bytes(big)
    with media_server({"/slow.png": small}) as base:
        qpath = tmp_path / "queries.parquet"
        pq.write_table(pa.table({"id": ["small", "big", "slow"],
                                 "image": ["small.png", "big.png", f"{base}/slow.png"]}), qpath)
        out = tmp_path / "out"
        assert run_job(
            "pipelines.search",
            ["--queries", qpath, "--corpus-embeddings", cdir, "--output", out, "--top-k", 3, "--model", tiny_clip,
             "--max-bytes", len(small) + 10, "--allow-http", "--http-timeout", 1, "--fetch-threads", 2],
        ) == 0
    results, errors, _ = read_search(out)
    assert set(results) == {"small"} and set(errors) == {"big", "slow"}
    assert "--max-bytes" in errors["big"]["error"]
    assert "timed out" in errors["slow"]["error"]
    order, scores = brute_force(st.encode_query([Image.open(tmp_path / "small.png").convert("RGB")]), corpus,
                                "cosine", 3)
    assert_matches_brute_force(results, ["small"], doc_ids, order, scores)
