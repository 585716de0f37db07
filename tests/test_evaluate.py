"""`mmembed evaluate` and the --if-better gate: ST's InformationRetrievalEvaluator is the reference.

The retrieval set is written in code (mmembed/testing/judged.py): 210 texts on 30 subjects, 30 queries,
some with several relevant documents and some with one relevant among judged non-relevant ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmembed.errors import EXIT_NOT_BETTER
from mmembed.testing.judged import judged_set, write_beir
from tests.conftest import run_job
from tests.helpers import decoded, image_bytes
from tests.s3_fixtures import moto_server, s3  # noqa: F401 - fixtures

KS = [1, 3, 5, 10, 100]
LOCAL = ["--executor", "local"]


def st_reference(model, queries: dict, corpus: dict, qrels_rows) -> dict:
    """ST's evaluator on the same corpus, queries and judgements: {"ndcg@10": ...}."""
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    relevant = {}
    for q, d, s in qrels_rows:
        if s > 0:
            relevant.setdefault(q, set()).add(d)
    ev = InformationRetrievalEvaluator(queries, corpus, relevant, mrr_at_k=KS, ndcg_at_k=KS, accuracy_at_k=KS,
                                       precision_recall_at_k=KS, map_at_k=KS, write_csv=False)
    prefix = f"{model.similarity_fn_name}_"
    return {k[len(prefix):]: v for k, v in ev(model).items() if k.startswith(prefix)}


def versions(store) -> dict:
    from mmembed.stores.store import Store

    s = Store(str(store))
    return {"current": (s.current() or {}).get("path"), "versions": {v["version"]: v for v in s.versions()}}


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    return write_beir(tmp_path_factory.mktemp("judged"))


@pytest.fixture(scope="module")
def minilm_store(tmp_path_factory, judged, minilm_path):
    """A store whose CURRENT is MiniLM over the judged corpus."""
    store = tmp_path_factory.mktemp("store") / "s"
    assert run_job("pipelines.reembed", ["--input", judged["corpus"], "--store", store, "--model", minilm_path,
                                         *LOCAL]) == 0
    return store


def test_evaluate_equals_st_on_minilm_and_is_recorded(minilm_store, judged, minilm_path, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "metrics.json"
    argv = [minilm_store, "--queries", judged["queries"], "--qrels", judged["qrels"], "--json", out, *LOCAL]
    assert run_job("pipelines.evaluate", argv) == 0
    printed = capsys.readouterr().out
    ours = json.loads(out.read_text())
    corpus, queries, qrels = judged_set()
    ref = st_reference(SentenceTransformer(minilm_path, device="cpu"), queries, corpus, qrels)
    assert set(ours) == {f"{m}@{k}" for m in ("accuracy", "precision", "recall", "mrr", "ndcg", "map") for k in KS}
    assert max(abs(ours[k] - ref[k]) for k in ours) <= 1e-6, {k: (ours[k], ref[k]) for k in ours}
    # The set is not trivial: the metrics are neither all perfect nor all zero.
    assert 0.2 < ours["ndcg@10"] < 0.99 and ours["precision@1"] < 1
    assert "ndcg" in printed and f"{ours['ndcg@10']:.4f}" in printed

    # Recorded in the snapshot's _eval/ folder, shown by `versions`, and not computed twice.
    listing = versions(minilm_store)
    (current,) = [v for v in listing["versions"].values() if v["current"]]
    assert current["evaluation"]["metrics"] == ours
    snap = minilm_store / listing["current"]
    (record_file,) = (snap / "_eval").glob("*.json")
    record = json.loads(record_file.read_text())
    assert record["queries"]["fingerprint"].startswith("sha256:") and record["qrels"]["judgements"] == len(qrels)
    assert record["corpus"]["relevant_not_in_corpus"] == 0
    assert not (minilm_store / "_work").exists()  # the work folder is removed
    assert run_job("pipelines.evaluate", argv) == 0
    assert "recorded evaluation" in capsys.readouterr().out
    assert json.loads(out.read_text()) == ours
    assert run_job("pipelines.versions", [minilm_store]) == 0
    assert f"ndcg@10={ours['ndcg@10']:.4f}" in capsys.readouterr().out


def test_relevant_documents_missing_from_the_corpus_are_misses(minilm_store, judged, minilm_path, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    corpus, queries, qrels = judged_set()
    extra = [("q00", "not-in-corpus-1", 1), ("q03", "not-in-corpus-2", 1), ("q05", "d000", 0)]
    rows = qrels + extra
    pq.write_table(pa.table({"query_id": [r[0] for r in rows], "corpus_id": [r[1] for r in rows],
                             "score": [r[2] for r in rows]}), tmp_path / "qrels.parquet")
    out = tmp_path / "m.json"
    assert run_job("pipelines.evaluate", [minilm_store, "--queries", judged["queries"], "--qrels",
                                          tmp_path / "qrels.parquet", "--json", out, *LOCAL]) == 0
    assert "2 relevant judged document(s) are not in the corpus" in capsys.readouterr().out
    ours = json.loads(out.read_text())
    # ST scores them as misses: its corpus lacks them too.
    ref = st_reference(SentenceTransformer(minilm_path, device="cpu"), queries, corpus, rows)
    assert max(abs(ours[k] - ref[k]) for k in ours) <= 1e-6


def test_text_queries_against_an_image_corpus_equal_st(tiny_clip, tmp_path):
    from sentence_transformers import SentenceTransformer

    images = {f"img{i:02d}": image_bytes(100 + i, fmt="JPEG" if i % 3 else "PNG", size=(48 + 4 * i, 40))
              for i in range(24)}
    (tmp_path / "media").mkdir()
    for name, data in images.items():
        (tmp_path / "media" / f"{name}.bin").write_bytes(data)
    pq.write_table(pa.table({"id": list(images), "image": [f"media/{n}.bin" for n in images]}),
                   tmp_path / "corpus.parquet")
    out = tmp_path / "emb"
    assert run_job("pipelines.embed", ["--input", tmp_path / "corpus.parquet", "--output", out, "--model", tiny_clip,
                                       *LOCAL]) == 0
    queries = {f"q{i}": text for i, text in enumerate(
        ["a red bicycle", "mountains at dawn", "a cat asleep", "espresso cup", "city at night", "green leaves"])}
    rows = [(q, f"img{(3 * i + j) % 24:02d}", 1) for i, q in enumerate(queries) for j in range(1 + i % 3)]
    # One more query, an image query whose file is missing: an error row of the query embedding.
    pq.write_table(pa.table({"id": [*queries, "qbad"], "text": [*queries.values(), None],
                             "image": [None] * len(queries) + ["media/missing.jpg"]}), tmp_path / "queries.parquet")
    judged = rows + [("qbad", "img00", 1)]
    pq.write_table(pa.table({"query_id": [r[0] for r in judged], "corpus_id": [r[1] for r in judged],
                             "score": [r[2] for r in judged]}), tmp_path / "qrels.parquet")
    metrics = tmp_path / "m.json"
    assert run_job("pipelines.evaluate", [out, "--queries", tmp_path / "queries.parquet", "--qrels",
                                          tmp_path / "qrels.parquet", "--json", metrics, *LOCAL]) == 0
    ours = json.loads(metrics.read_text())
    corpus = {name: decoded(data) for name, data in images.items()}
    ref = st_reference(SentenceTransformer(tiny_clip, device="cpu"), queries, corpus, rows)
    # The failed query retrieves nothing: a miss, worth 0 in every metric's mean over the 7 judged queries.
    n = len(queries)
    assert max(abs(ours[k] - ref[k] * n / (n + 1)) for k in ours) <= 1e-6, {k: (ours[k], ref[k]) for k in ours}
    (record,) = [json.loads(p.read_text()) for p in (out / "_eval").glob("*.json")]  # beside the embed shards
    assert record["queries"]["failed"] == ["qbad"] and record["queries"]["scored"] == n + 1


def test_metrics_in_chunks_equal_one_call_of_st():
    """evaluate hands ST's compute_metrics a chunk of queries at a time; recombined, equal to one call."""
    import numpy as np
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    from mmembed.inputs.judgements import Qrels
    from mmembed.jobs.evaluate import st_metrics

    rng = np.random.default_rng(3)
    qids = [f"q{i}" for i in range(50)]
    relevant = {q: {f"d{j}" for j in rng.choice(40, int(rng.integers(1, 6)), replace=False)} for q in qids[:45]}
    rows = [(q, f"d{j}", float(s)) for q in qids for j, s in zip(rng.choice(40, 20, replace=False), rng.random(20))]
    hits = pa.table({"query_id": [r[0] for r in rows], "doc_id": [r[1] for r in rows], "score": [r[2] for r in rows]})
    ours, scored = st_metrics(Qrels("x", relevant, 0, ""), qids, hits, tuple(KS), chunk=7)
    ev = InformationRetrievalEvaluator({q: q for q in qids}, {}, relevant, mrr_at_k=KS, ndcg_at_k=KS,
                                       accuracy_at_k=KS, precision_recall_at_k=KS, map_at_k=KS, write_csv=False)
    lists = [[{"corpus_id": d, "score": s} for q2, d, s in rows if q2 == q] for q in ev.queries_ids]
    ref = {f"{m.split('@')[0]}@{k}": float(v) for m, by_k in ev.compute_metrics(lists).items() for k, v in by_k.items()}
    assert scored == 45 and set(ours) == set(ref)
    assert max(abs(ours[k] - ref[k]) for k in ref) <= 1e-12


def test_the_gate_refuses_a_worse_model_and_accepts_a_better_one(judged, minilm_path, tiny_clip, tmp_path, capsys):
    store = tmp_path / "s"
    gate = ["--queries", judged["queries"], "--qrels", judged["qrels"], *LOCAL]
    assert run_job("pipelines.reembed", ["--input", judged["corpus"], "--store", store, "--model", minilm_path,
                                         *LOCAL]) == 0
    minilm_current = versions(store)["current"]
    # A random-weight model re-embeds the corpus; the gate at the end of the run keeps MiniLM.
    code = run_job("pipelines.reembed", ["--input", judged["corpus"], "--store", store, "--model", tiny_clip,
                                         "--activate-if-better", *gate])
    printed = capsys.readouterr().out
    assert code == EXIT_NOT_BETTER == 4
    assert versions(store)["current"] == minilm_current
    assert "is not better (ndcg@10" in printed and "< CURRENT's" in printed
    listing = versions(store)["versions"]
    (tiny,) = [v for v in listing if v.startswith("models--")] or [v for v in listing if "clip" in v]
    decision = listing[tiny]["decision"]
    assert decision["activated"] is False and decision["metric"] == "ndcg@10"
    assert decision["candidate"]["value"] < decision["current"]["value"]
    assert decision["queries"]["fingerprint"] and decision["qrels"]["fingerprint"]
    # The same through `activate --if-better`: both evaluations are reused, CURRENT kept, exit 4.
    assert run_job("pipelines.activate", [store, tiny, "--if-better", *gate]) == EXIT_NOT_BETTER
    out = capsys.readouterr().out
    assert out.count("recorded evaluation") == 2 and versions(store)["current"] == minilm_current
    # The reverse: with the random model CURRENT, MiniLM passes the gate.
    assert run_job("pipelines.activate", [store, tiny]) == 0
    minilm = next(v for v in listing if v != tiny)
    assert run_job("pipelines.activate", [store, minilm, "--if-better", "--metric", "mrr@10", *gate]) == 0
    assert versions(store)["current"] == minilm_current
    assert versions(store)["versions"][minilm]["decision"]["activated"] is True
    # A --min-gain no model can reach keeps CURRENT even for a better model.
    assert run_job("pipelines.activate", [store, tiny]) == 0
    assert run_job("pipelines.activate", [store, minilm, "--if-better", "--min-gain", "2", *gate]) == EXIT_NOT_BETTER
    assert versions(store)["current"] != minilm_current
    assert run_job("pipelines.versions", [store]) == 0
    assert "gate " in capsys.readouterr().out


# -- bad input: exit 2 before anything runs, with a message ----------------------------------------
def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


BAD = {
    "malformed TSV": ("queries", "q00\td000\n", "line 1: 2 tab-separated fields, expected 3"),
    "header not BEIR's": ("queries", "qid\tdoc\trel\nq00\td000\t1\n", "is not BEIR's"),
    "score not a number": ("queries", "query-id\tcorpus-id\tscore\nq00\td000\thigh\n", "score 'high' is not a number"),
    "malformed JSONL": ("jsonl", "query-id\tcorpus-id\tscore\nq00\td000\t1\n", "line 2: not JSON"),
    "unknown queries": ("queries", "query-id\tcorpus-id\tscore\nq00\td000\t1\nzz1\td001\t1\n",
                        "names 1 query id(s) that --queries"),
    "empty qrels": ("queries", "query-id\tcorpus-id\tscore\n", "holds no judgements"),
    "nothing relevant": ("queries", "query-id\tcorpus-id\tscore\nq00\td000\t0\n", "no judgement has a score > 0"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_judgements_exit_2_with_a_message(case, minilm_store, judged, tmp_path, capsys):
    kind, qrels_text, message = BAD[case]
    queries = judged["queries"]
    if kind == "jsonl":
        queries = _write(tmp_path / "queries.jsonl", '{"_id": "q00", "text": "fine"}\n{"_id": "q01", "text": \n')
    qrels = _write(tmp_path / "qrels" / "test.tsv", qrels_text)
    before = sorted(p for p in minilm_store.rglob("*"))
    assert run_job("pipelines.evaluate", [minilm_store, "--queries", queries, "--qrels", qrels, *LOCAL]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert sorted(p for p in minilm_store.rglob("*")) == before  # nothing ran, nothing written


def test_targets_without_a_committed_snapshot_exit_2(judged, tmp_path, capsys):
    from mmembed.stores.store import Store
    from tests.test_store import fake_snapshot

    store = Store(str(tmp_path / "s"), create=True)
    fake_snapshot(store, "org--m", "abc123-00000000", records=3, complete=False)
    args = ["--queries", judged["queries"], "--qrels", judged["qrels"], *LOCAL]
    assert run_job("pipelines.evaluate", [tmp_path / "s", *args]) == 2
    assert "no CURRENT version" in capsys.readouterr().err
    assert run_job("pipelines.evaluate", [tmp_path / "s", "--version", "org--m/abc123-00000000", *args]) == 2
    assert "no committed version" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert run_job("pipelines.evaluate", [tmp_path / "plain", *args]) == 2
    assert "neither an mmembed store" in capsys.readouterr().err


def test_gate_options_are_checked_before_anything_runs(minilm_store, judged, capsys):
    listing = versions(minilm_store)["versions"]
    (version,) = listing
    gate = ["--queries", judged["queries"], "--qrels", judged["qrels"]]
    assert run_job("pipelines.activate", [minilm_store, version, "--if-better", "--metric", "ndcg10", *gate]) == 2
    assert "expected <name>@<k>" in capsys.readouterr().err
    assert run_job("pipelines.activate", [minilm_store, version, "--if-better"]) == 2
    assert "--if-better needs --queries and --qrels" in capsys.readouterr().err
    assert run_job("pipelines.reembed", ["--input", judged["corpus"], "--store", minilm_store, "--model", "m",
                                         "--activate-if-better", "--queries", judged["queries"]]) == 2
    assert "needs --queries and --qrels" in capsys.readouterr().err


def test_a_store_and_judgements_on_s3(s3, judged, minilm_path, tmp_path):
    """The same evaluation and gate with the store, queries and qrels on an object store (moto)."""
    from tests.s3_fixtures import s3fs_for

    server, bucket, opts = s3
    fs = s3fs_for(server)
    for name in ("queries", "qrels", "corpus"):
        fs.put_file(judged[name], f"{bucket}/judged/{Path(judged[name]).name}")
    store = f"s3://{bucket}/store"
    q, r = (f"s3://{bucket}/judged/{Path(judged[k]).name}" for k in ("queries", "qrels"))
    common = ["--storage-options", opts, *LOCAL]
    assert run_job("pipelines.reembed", ["--input", f"s3://{bucket}/judged/corpus.parquet", "--store", store,
                                         "--model", minilm_path, *common]) == 0
    local, remote = tmp_path / "local.json", tmp_path / "remote.json"
    assert run_job("pipelines.evaluate", [store, "--queries", q, "--qrels", r, "--json", remote, *common]) == 0
    assert run_job("pipelines.evaluate", [store, "--queries", judged["queries"], "--qrels", judged["qrels"],
                                          "--json", local, *common]) == 0
    assert json.loads(remote.read_text()) == json.loads(local.read_text())  # same vectors, same metrics
    assert len(fs.glob(f"{bucket}/store/**/_eval/*.json")) == 1  # same files' bytes: one record, reused
    assert not fs.exists(f"{bucket}/store/_work")
