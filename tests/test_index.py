"""`mmembed index` and `mmembed search --index`: FAISS indexes over embed outputs.

Builds run in the test process (no Ray); only the `search --index` jobs start Ray. A flat
index and an IVF index probing every list must return exactly what the exact search returns.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_job
from tests.test_search import (
    assert_matches_brute_force,
    brute_force,
    read_search,
    synthetic_search_inputs,
    write_embeddings,
)

pytest.importorskip("faiss")


def build(embeddings, output, *extra) -> int:
    import pipelines.index as index_job

    return index_job.main(["--embeddings", str(embeddings), "--output", str(output), *map(str, extra)])


def ann_search(index_dir, queries: np.ndarray, k: int, **tune):
    from mmembed.stores.index import AnnIndex

    return AnnIndex.load(str(index_dir), **tune).search(queries, k)


def clustered(rng, n: int, dim: int, clusters: int) -> np.ndarray:
    """Points around a few centres, as real embeddings group by topic."""
    centres = rng.normal(size=(clusters, dim))
    return (centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def recall(doc_ids, ids, order) -> float:
    return float(np.mean([len(set(d) & {ids[j] for j in o}) / len(o) for d, o in zip(doc_ids, order)]))


@pytest.fixture
def no_ray(monkeypatch):
    from mmembed.executors import cluster

    def refuse(*_a, **_k):
        raise AssertionError("Ray must not start for a refused configuration")

    monkeypatch.setattr(cluster, "init_ray", refuse)


# --------------------------------------------------------------------------------------------
# search --index equals the exact search (Ray)
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_flat_and_full_probe_ivf_equal_exact_search(ray_session, tmp_path, similarity):
    corpus, queries, doc_ids, qids, cdir, qdir = synthetic_search_inputs(tmp_path, similarity, seed=11)
    k = 12
    common = ["--queries", qdir, "--top-k", k, "--query-batch-size", 4]
    assert run_job("pipelines.search", [*common, "--corpus-embeddings", cdir, "--output", tmp_path / "exact"]) == 0
    exact, _, _ = read_search(tmp_path / "exact")
    order, scores = brute_force(queries, corpus, similarity, k)
    assert_matches_brute_force(exact, qids, doc_ids, order, scores)

    assert build(cdir, tmp_path / "flat") == 0  # 230 vectors: flat by default
    # Built to probe 1 of 4 lists; the search probes all 4, which must be exact.
    assert build(cdir, tmp_path / "ivf", "--kind", "ivf-flat", "--nlist", 4, "--nprobe", 1) == 0
    for name, extra in (("flat", []), ("ivf", ["--nprobe", 4])):
        out = tmp_path / f"out-{name}"
        assert run_job("pipelines.search", [*common, "--index", tmp_path / name, "--output", out, *extra]) == 0
        got, errors, manifest = read_search(out)
        assert not errors and set(got) == set(qids)
        for qid in qids:
            assert [(d, r) for d, _, r in got[qid]] == [(d, r) for d, _, r in exact[qid]], (name, qid)
            np.testing.assert_allclose([s for _, s, _ in got[qid]], [s for _, s, _ in exact[qid]], atol=1e-5, rtol=0)
        assert manifest["input"]["index"]["uri"] == str(tmp_path / name)
        assert manifest["counts"]["written"] == len(qids) * k and manifest["counts"]["unaccounted"] == 0
    index_manifest = json.loads((tmp_path / "ivf" / "_manifest.json").read_text())
    assert index_manifest["index"] == {"kind": "ivf-flat", "nlist": 4, "nprobe": 1, "train_size": 230}
    assert index_manifest["metric"] == "inner_product" and index_manifest["counts"]["written"] == 230


# --------------------------------------------------------------------------------------------
# Approximate kinds, builds (no Ray)
# --------------------------------------------------------------------------------------------
def test_hnsw_and_ivf_reach_high_recall_on_a_small_corpus(tmp_path):
    rng = np.random.default_rng(5)
    points = clustered(rng, 3040, 32, 20)
    corpus, queries = points[:3000], points[3000:]  # queries from the same clusters
    ids = [f"d{i}" for i in range(len(corpus))]
    cdir = write_embeddings(tmp_path / "corpus", ids, corpus, shards=3, similarity="cosine")
    order, _ = brute_force(queries, corpus, "cosine", 10)
    # ivf-sq8 compares 8-bit codes, so near-equal neighbours in these tight clusters can swap places.
    for kind, extra, least in (("hnsw", [], 0.95), ("ivf-flat", ["--nlist", 32, "--nprobe", 4], 0.95),
                               ("ivf-sq8", ["--nlist", 32, "--nprobe", 4], 0.9)):
        assert build(cdir, tmp_path / kind, "--kind", kind, *extra) == 0
        _, found = ann_search(tmp_path / kind, queries, 10)
        r = recall(found, ids, order)
        assert r >= least, (kind, r)
    # One list of 32 is a fraction of the corpus: recall drops, so the lists really are skipped.
    _, found = ann_search(tmp_path / "ivf-flat", queries, 10, nprobe=1)
    assert recall(found, ids, order) < recall(ann_search(tmp_path / "ivf-flat", queries, 10)[1], ids, order)


def test_ivf_search_widens_until_every_query_has_k_hits(tmp_path):
    """nprobe 1 of 16 lists holds ~14 of 230 vectors: k = 60 needs more lists, and gets them."""
    corpus, queries, doc_ids, _, cdir, _ = synthetic_search_inputs(tmp_path, "cosine", seed=8)
    assert build(cdir, tmp_path / "ivf", "--kind", "ivf-flat", "--nlist", 16, "--nprobe", 1) == 0
    scores, found = ann_search(tmp_path / "ivf", queries, 60)
    assert found.shape == (len(queries), 60) and all(d is not None for d in found.ravel())
    assert all(len(set(row)) == 60 for row in found)
    assert np.isfinite(scores).all() and (np.diff(scores, axis=1) <= 1e-6).all()
    # Each hit's score is its true cosine similarity.
    unit = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    rows = {d: i for i, d in enumerate(doc_ids)}
    truth = np.array([[q[i] @ unit[rows[d]] for d in found[i]] for i in range(len(queries))])
    np.testing.assert_allclose(scores, truth, atol=1e-5)


def test_default_kind_follows_corpus_size():
    from mmembed.stores.index import IndexParams

    assert IndexParams().resolve(9_999, 384).to_dict() == {"kind": "flat"}
    assert IndexParams().resolve(100_000, 384).to_dict() == {"kind": "ivf-flat", "nlist": 256, "nprobe": 16,
                                                            "train_size": 16_384}
    big = IndexParams().resolve(1_000_000, 384)
    assert (big.kind, big.nlist, big.nprobe) == ("ivf-flat", 1024, 64)
    assert IndexParams(nlist=8).resolve(500, 16).kind == "ivf-flat"  # an IVF option asks for IVF
    assert IndexParams(kind="hnsw").resolve(500, 16).to_dict() == {"kind": "hnsw", "m": 32, "ef_construction": 80,
                                                                   "ef_search": 128}


def test_index_from_store_root_reads_current(tmp_path):
    from mmembed.stores.store import Snapshot, Store

    rng = np.random.default_rng(2)
    root = tmp_path / "store"
    store = Store(str(root), create=True)
    store.ensure_marker()
    snaps = {}
    for name, ids in (("20260101T000000000000Z-aaaaaa", ["old-a", "old-b", "old-c"]),
                      ("20260102T000000000000Z-bbbbbb", ["new-a", "new-b", "new-c", "new-d"])):
        vectors = rng.normal(size=(len(ids), 8)).astype(np.float32)
        snap_dir = write_embeddings(root / "m" / "v1" / name, ids, vectors, 2, "cosine")
        manifest = json.loads((snap_dir / "_manifest.json").read_text())
        (snap_dir / "_manifest.json").write_text(json.dumps({**manifest, "job": "reembed"}))
        snaps[name] = (ids, vectors)
    store.set_current(Snapshot("m", "v1", "20260101T000000000000Z-aaaaaa"))
    store.set_current(Snapshot("m", "v1", "20260102T000000000000Z-bbbbbb"))
    assert build(root, tmp_path / "idx") == 0
    manifest = json.loads((tmp_path / "idx" / "_manifest.json").read_text())
    assert manifest["source"]["root"] == str(root / "m" / "v1" / "20260102T000000000000Z-bbbbbb")
    assert manifest["source"]["job"] == "reembed" and manifest["counts"]["written"] == 4
    ids, vectors = snaps["20260102T000000000000Z-bbbbbb"]
    _, found = ann_search(tmp_path / "idx", vectors, 2)
    assert [row[0] for row in found] == ids  # each vector's nearest is itself
    # the second hit is the other CURRENT vector of highest cosine, by numpy (k=2 of 4, so it can be wrong)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cos = unit @ unit.T
    np.fill_diagonal(cos, -np.inf)
    assert [row[1] for row in found] == [ids[j] for j in cos.argmax(axis=1)]


def test_rebuild_replaces_the_previous_build_files(tmp_path, capsys):
    rng = np.random.default_rng(3)
    corpus = rng.normal(size=(300, 16)).astype(np.float32)
    ids = [f"d{i}" for i in range(300)]
    cdir = write_embeddings(tmp_path / "corpus", ids, corpus, shards=2, similarity="cosine")
    out = tmp_path / "idx"
    assert build(cdir, out, "--kind", "hnsw") == 0
    first = json.loads((out / "_manifest.json").read_text())
    (out / "index-deadbeef.faiss").write_bytes(b"left by a build that died before its manifest")
    assert build(cdir, out, "--kind", "ivf-flat", "--nlist", 4) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert json.loads((out / "_manifest.json").read_text()) == first  # the refused build changed nothing
    assert build(cdir, out, "--kind", "ivf-flat", "--nlist", 4, "--nprobe", 4, "--overwrite") == 0
    second = json.loads((out / "_manifest.json").read_text())
    assert second["index"]["kind"] == "ivf-flat"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["_manifest.json", second["files"]["index"]["name"], second["files"]["ids"]["name"]]
    )
    assert {f["name"] for f in first["files"].values()}.isdisjoint(f["name"] for f in second["files"].values())
    order, scores = brute_force(corpus[:5], corpus, "cosine", 3)
    got_scores, found = ann_search(out, corpus[:5], 3)
    assert [list(f) for f in found] == [[ids[j] for j in o] for o in order]
    np.testing.assert_allclose(got_scores, scores, atol=1e-5)


def write_quantised(out, ids, vectors, keep_float: bool):
    """An int8 embed output as `embed --precision int8 [--keep-float]` writes it."""
    from sentence_transformers.util.quantization import quantize_embeddings

    dim = vectors.shape[1]
    ranges = np.vstack((vectors.min(0), vectors.max(0)))
    write_embeddings(out, ids, vectors, 2, "cosine")
    manifest = json.loads((out / "_manifest.json").read_text())
    for f in manifest["files"]:
        t = pq.read_table(out / f["name"])
        floats = t.column("embedding").combine_chunks()
        codes = quantize_embeddings(np.asarray(floats.flatten()).reshape(-1, dim), "int8", ranges=ranges)
        t = t.set_column(1, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(codes.reshape(-1)), dim))
        if keep_float:
            t = t.append_column("embedding_float", floats)
        pq.write_table(t, out / f["name"])
    manifest["model"].update(precision="int8", quantization={
        "precision": "int8", "stored_dim": dim, "packed_bits": False, "calibration": {"records": len(ids)},
        "float_column": "embedding_float" if keep_float else None, "ranges": ranges.tolist()})
    (out / "_manifest.json").write_text(json.dumps(manifest))
    return out


def test_quantised_corpus_is_indexed_from_its_float_column(tmp_path, capsys):
    rng = np.random.default_rng(4)
    corpus = rng.normal(size=(120, 16)).astype(np.float32)
    ids = [f"d{i}" for i in range(120)]
    with_float = write_quantised(tmp_path / "int8-float", ids, corpus, keep_float=True)
    assert build(with_float, tmp_path / "idx") == 0
    manifest = json.loads((tmp_path / "idx" / "_manifest.json").read_text())
    assert (manifest["source"]["column"], manifest["source"]["precision"]) == ("embedding_float", "int8")
    queries = rng.normal(size=(4, 16)).astype(np.float32)
    order, scores = brute_force(queries, corpus, "cosine", 5)
    got, found = ann_search(tmp_path / "idx", queries, 5)
    assert [list(f) for f in found] == [[ids[j] for j in o] for o in order]
    np.testing.assert_allclose(got, scores, atol=1e-5)

    codes_only = write_quantised(tmp_path / "int8", ids, corpus, keep_float=False)
    assert build(codes_only, tmp_path / "idx2") == 2
    err = capsys.readouterr().err
    assert "--precision int8 --keep-float" in err and "mmembed search --corpus-embeddings" in err
    assert not (tmp_path / "idx2").exists()


# --------------------------------------------------------------------------------------------
# Refusals: exit 2, nothing written, Ray never started
# --------------------------------------------------------------------------------------------
def test_index_refusals(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    cdir = write_embeddings(tmp_path / "corpus", ["a", "b", "c"], rng.normal(size=(3, 4)), 1, "cosine")
    assert build(tmp_path / "nothing", tmp_path / "o1") == 2
    assert "not a finished `mmembed embed` output" in capsys.readouterr().err
    unfinished = write_embeddings(tmp_path / "unfinished", ["a"], rng.normal(size=(1, 4)), 1, "cosine")
    m = json.loads((unfinished / "_manifest.json").read_text())
    (unfinished / "_manifest.json").write_text(json.dumps({**m, "status": "running"}))
    assert build(unfinished, tmp_path / "o1") == 2
    assert "not a finished `mmembed embed` output" in capsys.readouterr().err
    assert build(cdir, cdir, "--overwrite") == 2  # would replace the embed output's manifest
    assert "is --embeddings" in capsys.readouterr().err  # an output must not be its own input
    assert build(cdir, tmp_path / "o1", "--kind", "hnsw", "--nlist", 4) == 2
    assert "--nlist do(es) not apply to --kind hnsw" in capsys.readouterr().err
    manhattan = write_embeddings(tmp_path / "manhattan", ["a"], rng.normal(size=(1, 4)), 1, "manhattan")
    assert build(manhattan, tmp_path / "o1") == 2
    assert "no FAISS metric" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    assert build(cdir, tmp_path / "o1") == 2
    assert 'pip install "mmembed[index]"' in capsys.readouterr().err
    assert not (tmp_path / "o1").exists()


def test_search_index_refusals_before_ray(tmp_path, capsys, monkeypatch, no_ray):
    import pipelines.search as search_job

    rng = np.random.default_rng(1)
    cdir = write_embeddings(tmp_path / "corpus", ["a", "b", "c"], rng.normal(size=(3, 8)), 1, "cosine")
    other = write_embeddings(tmp_path / "other", ["x", "y", "z"], rng.normal(size=(3, 8)), 1, "cosine")
    assert build(cdir, tmp_path / "idx") == 0
    capsys.readouterr()

    def search(queries, *extra):
        return search_job.main(["--queries", str(queries), "--index", str(tmp_path / "idx"), "--output",
                                str(tmp_path / "out"), "--top-k", "2", *map(str, extra)])

    foreign = write_embeddings(tmp_path / "q-foreign", ["q"], rng.normal(size=(1, 8)), 1, "cosine")
    m = json.loads((foreign / "_manifest.json").read_text())
    m["model"]["name"] = "another-model"
    (foreign / "_manifest.json").write_text(json.dumps(m))
    assert search(foreign) == 2
    assert "query embeddings come from another-model" in capsys.readouterr().err
    narrow = write_embeddings(tmp_path / "q-narrow", ["q"], rng.normal(size=(1, 4)), 1, "cosine")
    assert search(narrow) == 2
    assert "query dim 4 != corpus dim 8" in capsys.readouterr().err
    raw = tmp_path / "q.parquet"
    pq.write_table(pa.table({"id": ["q"], "text": ["hello"]}), raw)
    assert search(raw, "--model", "another-model") == 2
    assert "differs from the model that embedded the corpus (synthetic)" in capsys.readouterr().err
    good = write_embeddings(tmp_path / "q-good", ["q"], rng.normal(size=(1, 8)), 1, "cosine")
    assert search(good, "--nprobe", 4) == 2
    assert "--nprobe applies to IVF indexes" in capsys.readouterr().err
    assert search(good, "--corpus-embeddings", other) == 2
    assert "not from the --corpus-embeddings" in capsys.readouterr().err
    assert search_job.main(["--queries", str(good), "--index", str(cdir), "--output", str(tmp_path / "out"),
                            "--top-k", "2"]) == 2
    assert "not a finished `mmembed index` output" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "faiss", None)
    assert search(good) == 2
    assert 'pip install "mmembed[index]"' in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
