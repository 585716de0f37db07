"""`mmembed rerank`: parity with CrossEncoder.predict / CrossEncoder.rank, ranking, resolution, bad input.

Every test runs the real job (read pairs -> CPU preprocess pool -> scoring pool -> rank per
query -> Parquet) on Ray and compares with CrossEncoder on the same decoded inputs: scores to
max |diff| <= 1e-5 in fp32 on CPU, and the per-query order of CrossEncoder.rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_job
from tests.helpers import decoded, image_bytes

TOL = 1e-5

WORDS = (
    "cat dog bird fish horse tree flower river lake sea beach sky cloud sun moon star rain snow city town "
    "road street house garden park bridge tower red green blue yellow big small old new fast slow happy"
).split()


def sentence(seed: int, n: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=n))


def write_candidates(path: Path, table: pa.Table, files: int = 1) -> Path:
    """Write candidates as `files` Parquet files, so one query's rows span several blocks."""
    path.mkdir(parents=True, exist_ok=True)
    step = -(-table.num_rows // files)
    for i in range(files):
        pq.write_table(table.slice(i * step, step), path / f"part-{i}.parquet")
    return path


def read_rerank(out: Path) -> tuple[dict, dict, dict]:
    """({(query_id, doc_id): (score, rank)}, {pair id: error row}, manifest)."""
    results = {}
    for p in sorted(out.glob("part-*.parquet")):
        for r in pq.read_table(p).to_pylist():
            key = (r["query_id"], r["doc_id"])
            assert key not in results, f"duplicate pair {key}"
            results[key] = (r["score"], r["rank"])
    errors = {}
    for p in sorted((out / "_errors").glob("errors-*.parquet")):
        for r in pq.read_table(p).to_pylist():
            errors[tuple(json.loads(r["id"]))] = r
    return results, errors, json.loads((out / "_manifest.json").read_text())


def check_parity(model, results: dict, expected: dict[str, list[tuple[str, object]]], top_k: int | None = None):
    """Scores equal CrossEncoder.predict and per-query ranks equal CrossEncoder.rank."""
    worst = 0.0
    for qid, (query, docs) in expected.items():
        doc_ids = [d for d, _ in docs]
        inputs = [v for _, v in docs]
        scores = model.predict([[query, v] for v in inputs], batch_size=32)
        ranking = model.rank(query, inputs, top_k=top_k)
        got = {d: results[(qid, d)] for d in doc_ids if (qid, d) in results}
        assert len(got) == (len(doc_ids) if top_k is None else min(top_k, len(doc_ids)))
        for entry, rank in zip(ranking, range(1, len(ranking) + 1)):
            doc_id = doc_ids[entry["corpus_id"]]
            score, got_rank = got[doc_id]
            assert got_rank == rank, (qid, doc_id, got_rank, rank)
            worst = max(worst, abs(score - float(scores[entry["corpus_id"]])), abs(score - entry["score"]))
    assert worst <= TOL, worst
    return worst


def rerank(tmp_path, candidates: Path, model: str, *extra) -> tuple[dict, dict, dict]:
    out = tmp_path / "out"
    rc = run_job(
        "pipelines.rerank",
        ["--candidates", candidates, "--output", out, "--model", model, "--batch-size", 4,
         "--preprocess-batch-size", 4, *extra],
    )
    assert rc == 0
    return read_rerank(out)


def text_candidates(n_big: int = 30) -> tuple[pa.Table, dict]:
    """q0 has more candidates than a batch, a preprocess call or one input file; q1 a few."""
    expected, rows = {}, []
    for qid, n in (("q0", n_big), ("q1", 5)):
        query = sentence({"q0": 1, "q1": 2}[qid], 4)
        # Zero-padded doc ids: their order is the input order, the tie-break CrossEncoder.rank uses.
        docs = [(f"{qid}-d{j:03d}", sentence(1000 + 37 * j + len(qid), 3 + j % 7)) for j in range(n)]
        expected[qid] = (query, docs)
        rows += [{"query_id": qid, "query": query, "doc_id": d, "doc": t} for d, t in docs]
    return pa.Table.from_pylist(rows), expected


def test_cross_encoder_text_parity_and_grouped_ranking(ray_session, tiny_cross_encoder, cross_encoders, tmp_path):
    table, expected = text_candidates()
    # Three files, so q0's 30 candidates arrive in several blocks, preprocess calls and batches.
    cands = write_candidates(tmp_path / "cands", table, files=3)
    results, errors, manifest = rerank(tmp_path, cands, tiny_cross_encoder)
    assert not errors
    assert len(results) == table.num_rows
    worst = check_parity(cross_encoders(tiny_cross_encoder), results, expected)
    print(f"cross-encoder max |diff| = {worst:.2e}")
    assert manifest["job"] == "rerank" and manifest["counts"]["written"] == table.num_rows
    assert manifest["counts"]["unaccounted"] == 0
    # Scores are input-dependent (a random model mapping all pairs alike would pass vacuously).
    assert np.std([s for s, _ in results.values()]) > 1e-3


def test_top_k_keeps_the_best_k_per_query(ray_session, tiny_cross_encoder, cross_encoders, tmp_path):
    table, expected = text_candidates(n_big=12)
    cands = write_candidates(tmp_path / "cands", table, files=2)
    results, errors, manifest = rerank(tmp_path, cands, tiny_cross_encoder, "--top-k", 3)
    assert not errors
    check_parity(cross_encoders(tiny_cross_encoder), results, expected, top_k=3)
    assert sorted(r for _, r in results.values()) == [1, 1, 2, 2, 3, 3]
    assert manifest["counts"]["written"] == 6 and manifest["counts"]["below_top_k"] == table.num_rows - 6


@pytest.mark.slow
def test_qwen3vl_reranker_text_image_and_multimodal_docs(ray_session, tiny_reranker, cross_encoders, tmp_path):
    """Text and image queries against text, image and text+image documents (a struct column)."""
    media = tmp_path / "cands" / "media"
    media.mkdir(parents=True)
    for i in range(6):
        (media / f"img{i}.png").write_bytes(image_bytes(i, size=(40 + 8 * i, 48)))
    pil = {i: decoded((media / f"img{i}.png").read_bytes()) for i in range(6)}
    doc_cells = [  # (stored struct cell, what CrossEncoder gets)
        ({"text": "a red bird on a tree", "image": None}, "a red bird on a tree"),
        ({"text": None, "image": "media/img0.png"}, pil[0]),
        ({"text": "the city at night", "image": "media/img1.png"}, {"text": "the city at night", "image": pil[1]}),
        ({"text": "blue sea and a small boat", "image": None}, "blue sea and a small boat"),
        ({"text": None, "image": str(media / "img2.png")}, pil[2]),
        ({"text": "a dog in the park", "image": "media/img3.png"}, {"text": "a dog in the park", "image": pil[3]}),
    ]
    queries = {
        "tq": ({"text": "a happy dog", "image": None}, "a happy dog"),
        "iq": ({"text": None, "image": "media/img4.png"}, pil[4]),
    }
    rows, expected = [], {}
    for qid, (qcell, qvalue) in queries.items():
        docs = []
        for j, (dcell, dvalue) in enumerate(doc_cells):
            rows.append({"query_id": qid, "query": qcell, "doc_id": f"d{j}", "doc": dcell})
            docs.append((f"d{j}", dvalue))
        expected[qid] = (qvalue, docs)
    cands = write_candidates(tmp_path / "cands", pa.Table.from_pylist(rows))
    results, errors, _ = rerank(tmp_path, cands, tiny_reranker)
    assert not errors
    worst = check_parity(cross_encoders(tiny_reranker), results, expected)
    print(f"qwen3-vl reranker max |diff| = {worst:.2e}")


@pytest.mark.slow
def test_corpus_resolution_and_bad_input_become_error_rows(ray_session, tiny_reranker, cross_encoders, tmp_path):
    """Docs looked up by doc_id in a corpus manifest; missing ids, bad media and empty queries are error rows."""
    corpus_dir = tmp_path / "corpus"
    (corpus_dir / "img").mkdir(parents=True)
    for i in range(2):
        (corpus_dir / "img" / f"c{i}.png").write_bytes(image_bytes(10 + i))
    (corpus_dir / "img" / "broken.png").write_bytes(b"definitely not a png")
    corpus = pa.table(
        {
            "id": ["a", "b", "c", "bad"],
            "text": ["green garden with flowers", None, "an old bridge", None],
            "image": pa.array([None, "img/c0.png", "img/c1.png", "img/broken.png"], pa.string()),
        }
    )
    pq.write_table(corpus, corpus_dir / "corpus.parquet")
    pil = {i: decoded((corpus_dir / "img" / f"c{i}.png").read_bytes()) for i in range(2)}
    corpus_values = {"a": "green garden with flowers", "b": pil[0], "c": {"text": "an old bridge", "image": pil[1]}}
    rows = [
        {"query_id": "q", "query": "a garden", "doc_id": d} for d in ("a", "b", "c", "bad", "missing")
    ] + [{"query_id": "empty", "query": "", "doc_id": "a"}]
    cands = write_candidates(tmp_path / "cands", pa.Table.from_pylist(rows))
    results, errors, manifest = rerank(tmp_path, cands, tiny_reranker, "--corpus", corpus_dir / "corpus.parquet")
    expected = {"q": ("a garden", [(d, corpus_values[d]) for d in ("a", "b", "c")])}
    check_parity(cross_encoders(tiny_reranker), results, expected)
    assert set(errors) == {("q", "bad"), ("q", "missing"), ("empty", "a")}
    assert "not found in --corpus" in errors[("q", "missing")]["error"]
    assert "undecodable image" in errors[("q", "bad")]["error"]
    assert "empty text" in errors[("empty", "a")]["error"]
    assert all(e["stage"] == "preprocess" for e in errors.values())
    assert manifest["counts"] == {"records": 6, "written": 3, "errors": 3, "below_top_k": 0, "unaccounted": 0}


def test_string_and_bytes_cells(ray_session, tiny_reranker, cross_encoders, tmp_path):
    """A string column mixes text and media paths; a binary column holds image bytes."""
    cdir = tmp_path / "cands"
    cdir.mkdir()
    (cdir / "pic.png").write_bytes(image_bytes(21))
    raw = image_bytes(22)
    table = pa.table(
        {
            "query_id": ["q", "q", "q"],
            "query": pa.array([raw, raw, raw], pa.binary()),
            "doc_id": ["d0", "d1", "d2"],
            "doc": ["pic.png", "a photo of a cat.png with a caption", str(cdir / "pic.png")],
        }
    )
    pq.write_table(table, cdir / "cands.parquet")
    results, errors, _ = rerank(tmp_path, cdir, tiny_reranker)
    assert not errors
    pic = decoded((cdir / "pic.png").read_bytes())
    expected = {"q": (decoded(raw), [("d0", pic), ("d1", "a photo of a cat.png with a caption"), ("d2", pic)])}
    check_parity(cross_encoders(tiny_reranker), results, expected)


def test_missing_columns_fail_before_ray(tmp_path, capsys, monkeypatch):
    import pipelines.rerank as rerank_job
    from mmembed.executors import cluster

    def no_ray(*_a, **_k):
        raise AssertionError("Ray must not start for a bad candidates file")

    monkeypatch.setattr(cluster, "init_ray", no_ray)
    cands = tmp_path / "cands.parquet"
    pq.write_table(pa.table({"qid": ["q"], "query": ["x"], "doc_id": ["d"]}), cands)
    rc = rerank_job.main(["--candidates", str(cands), "--output", str(tmp_path / "out"), "--model", "unused"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "lack required column(s) query_id, doc" in err
    assert "found columns: qid, query, doc_id" in err
    assert "--corpus" in err
    assert not (tmp_path / "out").exists()


def test_a_pair_listed_twice_is_refused_before_ray(tiny_cross_encoder, tmp_path, capsys, monkeypatch):
    """Never rank one document twice: a repeated (query_id, doc_id) pair is refused, as embed refuses a
    repeated id, across files and row groups; the same ids in other pairs are fine."""
    import pipelines.rerank as rerank_job
    from mmembed.executors import cluster

    def no_ray(*_a, **_k):
        raise AssertionError("Ray must not start for repeated candidates")

    monkeypatch.setattr(cluster, "init_ray", no_ray)
    cands = tmp_path / "cands"
    cands.mkdir()
    pairs = [("q1", "d1"), ("q1", "d2"), ("q2", "d1"), ("q2", "d2")]
    table = pa.table({"query_id": [q for q, _ in pairs], "query": ["a question"] * 4,
                      "doc_id": [d for _, d in pairs], "doc": ["a document"] * 4})
    pq.write_table(table, cands / "a.parquet", row_group_size=2)
    pq.write_table(table.slice(1, 1), cands / "b.parquet")  # ("q1", "d2") again
    rc = rerank_job.main(["--candidates", str(cands), "--output", str(tmp_path / "out"), "--model", tiny_cross_encoder])
    err = capsys.readouterr().err
    assert rc == 2
    assert "list 1 (query_id, doc_id) pair(s) more than once" in err and "('q1', 'd2')" in err
    assert "('q1', 'd1')" not in err
    assert not (tmp_path / "out").exists()
