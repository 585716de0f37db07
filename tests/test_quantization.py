"""Quantised storage (`embed --precision int8|uint8|binary|ubinary`) and `search` over it.

The stored vectors are ST's quantize_embeddings of the float embeddings with the corpus-wide
ranges of the manifest; those ranges are ST's calibration (per-dimension min, max) over the
first --calibration-records records. Search quantises the queries the same way and, when
float vectors are stored, rescores the quantised hits with them.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sentence_transformers.util.quantization import quantize_embeddings

from tests.conftest import run_job
from tests.test_search import assert_matches_brute_force, brute_force, read_search

CALIBRATION = 7
QUERIES = ["how do I keep my sourdough starter alive?", "best time to see the milky way", "fix my bike chain"]


def stored(out, column="embedding"):
    """{id: stored vector} over an embed output's shards, and the column's Arrow type."""
    vectors, kind = {}, None
    for p in sorted(out.glob("part-*.parquet")):
        t = pq.read_table(p)
        kind = t.schema.field(column).type
        values = np.asarray(t.column(column).combine_chunks().flatten()).reshape(t.num_rows, -1)
        vectors.update(zip(t.column("id").to_pylist(), values))
    return vectors, kind


@pytest.fixture(scope="module")
def corpus(ray_session, minilm_path, tmp_path_factory):
    """The MiniLM demo corpus embedded as int8 (ranges from the first 7 records) and as binary with float vectors."""
    from sentence_transformers import SentenceTransformer

    from mmembed.testing.corpus import make_corpus

    root = tmp_path_factory.mktemp("quant")
    texts = make_corpus(root / "demo", photos=0, screenshots=0)["texts"]
    outs = {}
    for precision, extra in (("int8", ["--calibration-records", CALIBRATION]), ("binary", ["--keep-float"])):
        outs[precision] = root / precision
        assert run_job(
            "pipelines.embed",
            ["--input", texts, "--output", outs[precision], "--model", minilm_path, "--task", "document",
             "--precision", precision, "--shard-rows", 5, *extra],
        ) == 0
    model = SentenceTransformer(minilm_path, device="cpu")
    table = pq.read_table(texts).to_pydict()
    return {"root": root, "outs": outs, "ids": table["id"], "float": model.encode_document(table["text"]),
            "queries": model.encode_query(QUERIES), "model": model, "path": minilm_path}


@pytest.mark.slow
def test_int8_vectors_and_ranges_are_st_quantize_embeddings(corpus):
    out, ids, st_float = corpus["outs"]["int8"], corpus["ids"], corpus["float"]
    manifest = json.loads((out / "_manifest.json").read_text())
    q = manifest["model"]["quantization"]
    assert q["precision"] == "int8" and q["calibration"] == {"records": CALIBRATION} and q["float_column"] is None
    ranges = np.asarray(q["ranges"], dtype=np.float32)
    # ST's calibration over the first records: per-dimension min and max of their float embeddings.
    cal = st_float[:CALIBRATION]
    np.testing.assert_allclose(ranges, np.vstack((cal.min(0), cal.max(0))), atol=1e-5, rtol=0)
    vectors, kind = stored(out)
    assert kind == pa.list_(pa.int8(), manifest["model"]["dim"])
    mine = np.stack([vectors[i] for i in ids])
    assert np.array_equal(mine, quantize_embeddings(st_float, "int8", ranges=ranges))
    run = json.loads((out / "_run.json").read_text())
    assert run["identity"]["quantization"]["ranges"] == q["ranges"]  # a resume reuses exactly these


@pytest.mark.slow
def test_binary_vectors_are_st_quantize_embeddings_with_float_kept(corpus):
    out, ids, st_float = corpus["outs"]["binary"], corpus["ids"], corpus["float"]
    q = json.loads((out / "_manifest.json").read_text())["model"]["quantization"]
    assert q["packed_bits"] and q["stored_dim"] == 384 // 8 and q["ranges"] is None
    vectors, kind = stored(out)
    assert kind == pa.list_(pa.int8(), 48)
    assert np.array_equal(np.stack([vectors[i] for i in ids]), quantize_embeddings(st_float, "binary"))
    floats, kind = stored(out, q["float_column"])
    assert kind == pa.list_(pa.float32(), 384)
    assert np.abs(np.stack([floats[i] for i in ids]) - st_float).max() <= 1e-5


@pytest.mark.slow
def test_search_binary_with_rescoring_finds_the_float_top_hits(corpus):
    root, ids, k = corpus["root"], corpus["ids"], 3
    out = root / "search-binary"
    assert run_job(
        "pipelines.search",
        ["--queries", qfile(root), "--corpus-embeddings", corpus["outs"]["binary"], "--output", out, "--top-k", k,
         "--model", corpus["path"], "--rescore-multiplier", 2, "--corpus-block-rows", 4],
    ) == 0
    results, errors, manifest = read_search(out)
    assert not errors and manifest["model"]["rescored"]
    order, scores = brute_force(corpus["queries"], corpus["float"], corpus["model"].similarity_fn_name, k)
    assert_matches_brute_force(results, ["sour", "stars", "bike"], ids, order, scores)


@pytest.mark.slow
def test_search_int8_ranks_equal_numpy_on_stored_vectors(corpus):
    root, k = corpus["root"], 5
    cdir = corpus["outs"]["int8"]
    out = root / "search-int8"
    assert run_job(
        "pipelines.search",
        ["--queries", qfile(root), "--corpus-embeddings", cdir, "--output", out, "--top-k", k,
         "--model", corpus["path"], "--corpus-block-rows", 4],
    ) == 0
    results, errors, _ = read_search(out)
    assert not errors
    ranges = np.asarray(json.loads((cdir / "_manifest.json").read_text())["model"]["quantization"]["ranges"])
    qvec, _ = stored(out / "_query_embeddings")  # the float query vectors the search quantised
    vectors, _ = stored(cdir)
    doc_ids = sorted(vectors)
    docs = np.stack([vectors[d] for d in doc_ids]).astype(np.int64)
    for qid, got in results.items():
        qq = quantize_embeddings(qvec[qid][None, :].astype(np.float32), "int8", ranges=ranges).astype(np.int64)
        dots = (qq @ docs.T)[0]
        want = sorted(range(len(doc_ids)), key=lambda j: (-dots[j], doc_ids[j]))[:k]
        assert [d for d, _, _ in got] == [doc_ids[j] for j in want], qid
        assert [s for _, s, _ in got] == [float(dots[j]) for j in want]


def qfile(root):
    path = root / "queries.parquet"
    if not path.exists():
        pq.write_table(pa.table({"id": ["sour", "stars", "bike"], "text": QUERIES}), path)
    return path


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_encode_output_stores_st_quantized_vectors(precision):
    """The encoder's output table: ST's quantize_embeddings of its rows, masked where a row is an error."""
    from mmembed.stages.encode import EncodeStage, embedding_schema

    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(4, 16)).astype(np.float32)
    ranges = np.vstack((vecs.min(0), vecs.max(0))) if precision in ("int8", "uint8") else None
    stage = object.__new__(EncodeStage)  # only _output's state; no model
    stage.dim, stage.precision, stage.ranges, stage.keep_float = 16, precision, ranges, True
    stage.schema = embedding_schema(16, precision, keep_float=True)
    rows = [{"id": f"r{i}", "modality": "text", "stage": None, "error": None} for i in range(4)]
    rows[2] = {**rows[2], "stage": "preprocess", "error": "bad"}
    table = stage._output(rows, {i: vecs[i] for i in (0, 1, 3)}, {})
    emb = table.column("embedding").combine_chunks()
    assert emb.is_null().to_pylist() == [False, False, True, False]
    got = np.asarray(emb.values).reshape(4, -1)[[0, 1, 3]]  # .values keeps the null rows' slots
    assert np.array_equal(got, quantize_embeddings(vecs[[0, 1, 3]], precision, ranges=ranges))
    floats = np.asarray(table.column("embedding_float").combine_chunks().values).reshape(4, -1)
    assert np.array_equal(floats[[0, 1, 3]], vecs[[0, 1, 3]])


def test_binary_needs_a_dim_divisible_by_8(minilm_path, tmp_path, capsys):
    from pipelines import embed  # the command line, as a user runs it

    pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), tmp_path / "m.parquet")
    base = ["--input", str(tmp_path / "m.parquet"), "--output", str(tmp_path / "o"), "--model", minilm_path]
    assert embed.main([*base, "--precision", "binary", "--truncate-dim", "100"]) == 2
    assert "multiple of 8" in capsys.readouterr().err
    assert embed.main([*base, "--keep-float"]) == 2
    assert "quantised --precision" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_resumed_int8_run_reuses_its_calibrated_ranges(minilm_path, tmp_path):
    """plan() of a rerun takes the ranges its first attempt recorded in _run.json, so no second calibration
    can mix buckets; another calibration setting is refused as a different run."""
    from mmembed import cli
    from mmembed.jobs import embed
    from mmembed.outputs.runstate import RUN_NAME

    pq.write_table(pa.table({"id": ["a", "b"], "text": ["x", "y"]}), tmp_path / "m.parquet")
    argv = ["--input", str(tmp_path / "m.parquet"), "--output", str(tmp_path / "o"), "--model", minilm_path,
            "--precision", "int8", "--calibration-records", "2"]
    first = embed.plan(cli.parse("embed", argv))
    assert first["state"] == "new" and first["quantization"]["ranges"] is None
    ranges = [[-1.0] * first["dim"], [1.0] * first["dim"]]
    identity = {**first["identity"], "quantization": {**first["quantization"], "ranges": ranges}}
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / RUN_NAME).write_text(json.dumps({"status": "running", "identity": identity, "attempts": []}))
    again = embed.plan(cli.parse("embed", argv))
    assert again["state"] == "resume" and again["quantization"]["ranges"] == ranges
    assert again["identity"]["quantization"]["ranges"] == ranges
    from mmembed.errors import UsageError

    with pytest.raises(UsageError, match="quantization"):
        embed.plan(cli.parse("embed", [*argv[:-1], "3"]))
