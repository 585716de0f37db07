"""Every command that runs stages gives the same output in this process (--executor local) as on Ray
(--executor ray), on the same input; and a small input runs in this process by default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_job

TOPICS = {
    "bread": ["sourdough starter needs daily feeding", "a long cold proof gives an open crumb",
              "score the loaf before it goes into the oven", "rye flour makes a dense loaf"],
    "coffee": ["grind finer if the espresso runs fast", "steam milk to sixty degrees",
               "fresh beans give a thicker crema", "a pour-over needs a gooseneck kettle"],
    "bikes": ["oil the chain after a wet ride", "check tyre pressure every week",
              "a torque wrench protects carbon parts", "index the gears after a cable change"],
}


def texts() -> dict[str, str]:
    return {f"{topic}-{i}": t for topic, docs in TOPICS.items() for i, t in enumerate(docs)}


def manifest(path: Path, records: dict[str, str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": list(records), "text": list(records.values())}), path)
    return str(path)


def read_rows(out: Path) -> tuple[list[dict], list[dict], dict]:
    rows = [r for p in sorted(out.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    errors = [r for p in sorted(out.glob("_errors/*.parquet")) for r in pq.read_table(p).to_pylist()]
    return rows, errors, json.loads((out / "_manifest.json").read_text())


def assert_same(local: list[dict], ray: list[dict], key, tol: float = 1e-5) -> None:
    local, ray = sorted(local, key=key), sorted(ray, key=key)
    assert [key(r) for r in local] == [key(r) for r in ray]
    for a, b in zip(local, ray):
        for name, value in a.items():
            if isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
                np.testing.assert_allclose(np.asarray(value, np.float64), np.asarray(b[name], np.float64),
                                           atol=tol, err_msg=f"{name} of {key(a)}")
            else:
                assert value == b[name], (name, key(a))


QUERIES = {"q-bread": "how do I keep a sourdough starter alive", "q-coffee": "my espresso tastes sour",
           "q-bikes": "my chain squeaks"}


@pytest.mark.parametrize("lookup", [False, True], ids=["cells", "corpus-lookup"])
def test_rerank_same_on_both_executors(ray_session, tiny_cross_encoder, tmp_path, lookup):
    docs = texts()
    pairs = [(q, d) for q in QUERIES for d in docs]
    if lookup:  # query and document cells looked up by id, one document id missing from the corpus
        table = pa.table({"query_id": [q for q, _ in pairs] + ["q-bikes"],
                          "doc_id": [d for _, d in pairs] + ["gone"]})
        extra = ["--queries", manifest(tmp_path / "queries.parquet", QUERIES),
                 "--corpus", manifest(tmp_path / "corpus.parquet", docs)]
    else:
        table = pa.table({"query_id": [q for q, _ in pairs], "query": [QUERIES[q] for q, _ in pairs],
                          "doc_id": [d for _, d in pairs], "doc": [docs[d] for _, d in pairs]})
        extra = []
    pq.write_table(table, tmp_path / "candidates.parquet")
    outs = {}
    for executor in ("local", "ray"):
        outs[executor] = tmp_path / executor
        assert run_job("pipelines.rerank", ["--candidates", tmp_path / "candidates.parquet", "--output",
                                            outs[executor], "--model", tiny_cross_encoder, "--top-k", 3,
                                            "--executor", executor, *extra]) == 0
    (lr, le, lm), (rr, re_, rm) = read_rows(outs["local"]), read_rows(outs["ray"])
    assert (lm["resources"]["executor"], rm["resources"]["executor"]) == ("local", "ray")
    assert len(lr) == 3 * len(QUERIES) and lm["counts"] == rm["counts"]
    assert_same(lr, rr, key=lambda r: (r["query_id"], r["rank"]))
    assert sorted((e["id"], e["error"]) for e in le) == sorted((e["id"], e["error"]) for e in re_)
    assert len(le) == (1 if lookup else 0)


def test_search_and_retrieve_rerank_same_on_both_executors(ray_session, minilm_path, tiny_cross_encoder, tmp_path):
    corpus = manifest(tmp_path / "corpus.parquet", texts())
    queries = manifest(tmp_path / "queries.parquet", QUERIES)
    emb = tmp_path / "corpus-emb"
    assert run_job("pipelines.embed", ["--input", corpus, "--output", emb, "--model", minilm_path,
                                       "--task", "document", "--executor", "local"]) == 0
    outs = {}
    for executor in ("local", "ray"):
        outs[executor] = tmp_path / f"search-{executor}"
        assert run_job("pipelines.search", ["--queries", queries, "--corpus-embeddings", emb, "--model", minilm_path,
                                            "--top-k", 4, "--output", outs[executor], "--executor", executor]) == 0
    (lr, _, lm), (rr, _, rm) = read_rows(outs["local"]), read_rows(outs["ray"])
    assert (lm["resources"]["executor"], rm["resources"]["executor"]) == ("local", "ray")
    assert_same(lr, rr, key=lambda r: (r["query_id"], r["rank"]))
    assert {r["doc_id"].split("-")[0] for r in lr if r["query_id"] == "q-bread" and r["rank"] == 1} == {"bread"}
    for executor in ("local", "ray"):
        outs[executor] = tmp_path / f"rr-{executor}"
        assert run_job("pipelines.retrieve_rerank", [
            "--queries", queries, "--corpus", corpus, "--embedder", minilm_path, "--reranker", tiny_cross_encoder,
            "--retrieve-k", 5, "--top-k", 2, "--output", outs[executor], "--executor", executor]) == 0
    (lr, _, _), (rr, _, _) = (read_rows(outs[e] / "reranked") for e in ("local", "ray"))
    for step in ("corpus_embeddings", "candidates", "reranked"):
        m = json.loads((outs["local"] / step / "_manifest.json").read_text())
        assert m["resources"]["executor"] == "local", step
    assert_same(lr, rr, key=lambda r: (r["query_id"], r["rank"]))


def test_reembed_same_on_both_executors(ray_session, minilm_path, tmp_path):
    v1 = texts()
    v2 = {**{k: v for k, v in v1.items() if k != "bikes-3"}, "bread-0": v1["bread-0"] + " (edited)",
          "new-1": "a brand new record about tea"}
    snaps = {}
    for executor in ("local", "ray"):
        store = tmp_path / f"store-{executor}"
        for n, records in enumerate((v1, v2)):
            src = manifest(tmp_path / f"in-{executor}-{n}" / "m.parquet", records)
            assert run_job("pipelines.reembed", ["--input", src, "--store", store, "--model", minilm_path,
                                                 "--executor", executor]) == 0
        current = store / json.loads((store / "CURRENT").read_text())["path"]
        snaps[executor] = read_rows(current)
    (lr, le, lm), (rr, re_, rm) = snaps["local"], snaps["ray"]
    assert (lm["resources"]["executor"], rm["resources"]["executor"]) == ("local", "ray")
    assert lm["changes"] == rm["changes"] == {"new": 1, "changed": 1, "unchanged": 10, "deleted": 1, "embedded": 2}
    assert {r["id"] for r in lr} == set(v2) and not le and not re_
    assert_same(lr, rr, key=lambda r: r["id"])


def test_small_inputs_run_in_this_process_by_default(tiny_cross_encoder, minilm_path, tmp_path):
    """No cluster, no pool sizes, a small input: rerank and reembed run without starting Ray."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["HF_HUB_OFFLINE"] = "1"
    docs = texts()
    pq.write_table(pa.table({"query_id": ["q"] * len(docs), "query": ["sourdough"] * len(docs),
                             "doc_id": list(docs), "doc": list(docs.values())}), tmp_path / "candidates.parquet")
    src = manifest(tmp_path / "in" / "m.parquet", docs)
    for argv, out in ((["rerank", "--candidates", str(tmp_path / "candidates.parquet"), "--model", tiny_cross_encoder,
                        "--output", str(tmp_path / "ranked")], tmp_path / "ranked"),
                      (["reembed", "--input", src, "--store", str(tmp_path / "store"), "--model", minilm_path], None)):
        run = subprocess.run([sys.executable, "-m", "mmembed.cli", *argv], env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        if out is None:
            store = tmp_path / "store"
            out = store / json.loads((store / "CURRENT").read_text())["path"]
        assert json.loads((out / "_manifest.json").read_text())["resources"]["executor"] == "local", argv[0]
        assert "Started a local Ray instance" not in run.stderr + run.stdout
