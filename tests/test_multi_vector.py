"""Multi-vector (late-interaction) models: sentence-transformers 6's MultiVectorEncoder.

`mmembed embed` stores each record's token vectors as ST's `encode_document` (or `encode_query`) returns
them; commands that do not run multi-vector models yet refuse them before anything runs: loaded as a
SentenceTransformer, a ColBERT-style checkpoint falls back to mean pooling without its projection or mask
(wrong vectors, exit 0), and a ColQwen2 one fails on its configuration class.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmembed.models.loading import MULTI_VECTOR, ModelSpec, model_family
from tests.conftest import run_job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["a cat on the road", "the dog, and a bird!", "red", "one two three four five six seven eight nine ten " * 3,
         "paris is the capital of france.", "music"]


@pytest.fixture(scope="module")
def st_models(tiny_colbert, tiny_colqwen2):
    from sentence_transformers import MultiVectorEncoder

    return {p: MultiVectorEncoder(p, device="cpu") for p in (tiny_colbert, tiny_colqwen2)}


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("mv_texts")
    pq.write_table(pa.table({"id": [f"t{i}" for i in range(len(TEXTS))], "text": TEXTS}), d / "t.parquet")
    return d / "t.parquet"


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """Page-like images of several sizes (so patch counts differ within a batch) and one corrupt file."""
    d = tmp_path_factory.mktemp("mv_pages")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(80, 120), (200, 150), (64, 64), (300, 90), (120, 120), (160, 100)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"p{i}.png")
    (d / "broken.png").write_bytes(b"not a png at all")
    return d


def read_vectors(out) -> dict[str, np.ndarray]:
    t = pq.read_table(out, columns=["id", "embedding"])
    ids = t.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate ids"
    return {i: np.asarray(v, dtype=np.float32) for i, v in zip(ids, t.column("embedding").to_pylist())}


def assert_equal_to_st(got: dict, want: dict, atol=1e-5):
    assert got.keys() == want.keys()
    for key, ref in want.items():
        ref = np.asarray(ref, dtype=np.float32)
        assert got[key].shape == ref.shape, (key, got[key].shape, ref.shape)  # the same count per record
        np.testing.assert_allclose(got[key], ref, rtol=0, atol=atol, err_msg=key)


def test_family_is_read_as_sentence_transformers_reads_it(tiny_colbert, tiny_colqwen2, tiny_clip, tiny_cross_encoder):
    assert model_family(ModelSpec(tiny_colbert)) == MULTI_VECTOR
    assert model_family(ModelSpec(tiny_colqwen2)) == MULTI_VECTOR  # no ST files: by its ForRetrieval architecture
    assert model_family(ModelSpec(tiny_clip)) == "SentenceTransformer"
    assert model_family(ModelSpec(tiny_cross_encoder)) == "CrossEncoder"


@pytest.mark.parametrize("task", ["document", "query"])
def test_colbert_texts_equal_st(tiny_colbert, st_models, texts, tmp_path, task):
    """encode_document: the [D] prompt, the punctuation skiplist; encode_query: [Q] and expansion to 12."""
    out = tmp_path / "out"
    argv = ["--input", texts, "--output", out, "--model", tiny_colbert, "--executor", "local", "--batch-size", 4]
    assert run_job("pipelines.embed", argv + (["--task", "query"] if task == "query" else [])) == 0
    st = st_models[tiny_colbert]
    encode = st.encode_query if task == "query" else st.encode_document
    want = dict(zip([f"t{i}" for i in range(len(TEXTS))], encode(TEXTS, convert_to_numpy=True)))
    assert_equal_to_st(read_vectors(out), want)
    if task == "query":
        assert {len(v) for v in want.values()} == {12}
    m = json.loads((out / "_manifest.json").read_text())["model"]
    mv = m["multi_vector"]
    assert m["task"] == task and mv["similarity_fn_name"] == "maxsim"
    assert mv["vectors"] == sum(len(v) for v in want.values())
    assert mv["bytes_per_record"] == pytest.approx(mv["vectors"] * 16 * 4 / len(TEXTS), abs=0.1)
    assert mv["stored_bytes_per_record"] > 0


def test_colqwen2_pages_equal_st_on_ray_and_in_process(ray_session, tiny_colqwen2, st_models, pages, tmp_path):
    st = st_models[tiny_colqwen2]
    files = sorted(p for p in pages.iterdir() if p.name != "broken.png")
    want = dict(zip([p.name for p in files], st.encode_document([Image.open(p) for p in files], convert_to_numpy=True)))
    outs = {}
    for executor in ("ray", "local"):
        out = outs[executor] = tmp_path / executor
        argv = ["--input", pages, "--output", out, "--model", tiny_colqwen2, "--executor", executor,
                "--batch-size", 3, "--preprocess-batch-size", 2]
        assert run_job("pipelines.embed", argv) == 0
        assert_equal_to_st(read_vectors(out), want)
        errors = pq.read_table(out / "_errors").to_pylist()
        assert [e["id"] for e in errors] == ["broken.png"] and errors[0]["stage"] == "preprocess"
        m = json.loads((out / "_manifest.json").read_text())
        assert m["counts"]["written"] == len(files) and m["counts"]["errors"] == 1
        assert m["model"]["pixels"]["transport"] == "uint8"  # the CPU pool ships uint8 pixels here too
        assert m["model"]["pixels"]["layout"] == "frames"
    # Equal up to the float noise of batching records of other patch counts together (ST's own, too).
    assert_equal_to_st(read_vectors(outs["ray"]), read_vectors(outs["local"]), atol=1e-6)


def test_token_pooling_and_float16_equal_st(tiny_colqwen2, st_models, pages, tmp_path):
    from sentence_transformers.multi_vector_encoder.modules import HierarchicalTokenPooling

    st = st_models[tiny_colqwen2]
    files = sorted(p for p in pages.iterdir() if p.name != "broken.png")
    images = [Image.open(p) for p in files]
    pooling = HierarchicalTokenPooling(pool_factor=2, num_protected_tokens=1)
    want = dict(zip([p.name for p in files], st.encode_document(images, convert_to_numpy=True, token_pooling=pooling)))
    full = tmp_path / "full"
    assert run_job("pipelines.embed", ["--input", pages, "--output", full, "--model", tiny_colqwen2,
                                       "--executor", "local"]) == 0
    out = tmp_path / "pooled"
    assert run_job("pipelines.embed", ["--input", pages, "--output", out, "--model", tiny_colqwen2,
                                       "--executor", "local", "--token-pool-factor", 2, "--precision", "float16"]) == 0
    got = read_vectors(out)
    assert pq.read_schema(out / sorted(p.name for p in out.glob("part-*.parquet"))[0]).field("embedding").type == \
        pa.list_(pa.list_(pa.float16(), 16))
    want16 = {k: v.astype(np.float16).astype(np.float32) for k, v in want.items()}
    assert_equal_to_st(got, want16, atol=1e-3)
    pooled = json.loads((out / "_manifest.json").read_text())["model"]["multi_vector"]
    unpooled = json.loads((full / "_manifest.json").read_text())["model"]["multi_vector"]
    assert pooled["token_pooling"] == {"method": "hierarchical", "pool_factor": 2.0, "protected_tokens": 1}
    assert pooled["vectors"] < 0.6 * unpooled["vectors"]
    assert pooled["bytes_per_record"] < 0.3 * unpooled["bytes_per_record"]  # half the vectors at half the bytes


def test_single_vector_options_are_refused(tiny_colbert, texts, tmp_path, capsys):
    for extra, words in ((["--precision", "int8"], "multi-vector"), (["--truncate-dim", "8"], "--truncate-dim"),
                         (["--token-pool-factor", "0.5"], ">= 1")):
        out = tmp_path / "out"
        argv = ["--input", texts, "--output", out, "--model", tiny_colbert, "--executor", "local", *extra]
        assert run_job("pipelines.embed", argv) == 2
        assert words in capsys.readouterr().err
        assert not out.exists()


def test_resume_after_a_kill_has_no_duplicates(tiny_colbert, st_models, tmp_path):
    m = tmp_path / "m.parquet"
    texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(1500)]
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(texts))], "text": texts}), m)
    out = tmp_path / "out"
    argv = ["--input", m, "--output", out, "--model", tiny_colbert, "--executor", "local", "--shard-rows", 20,
            "--batch-size", 2]
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.embed", *map(str, argv)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while len(list(out.glob("part-*.parquet"))) < 2:
            assert proc.poll() is None, "finished (or failed) before it could be killed"
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "_manifest.json").exists()
    assert run_job("pipelines.embed", argv) == 0
    got = read_vectors(out)  # asserts no duplicate ids
    want = dict(zip([f"r{i}" for i in range(len(texts))], st_models[tiny_colbert].encode_document(
        texts, convert_to_numpy=True)))
    assert_equal_to_st(got, want)
    assert json.loads((out / "_manifest.json").read_text())["counts"]["resumed_from_committed"] > 0


QUERIES = ["a cat", "the capital of france", "bird on a road", "music and sound", "seven eight"]


def text_corpus(tmp_path, n: int):
    """({id: text} of n documents, their manifest, a manifest of QUERIES)."""
    docs = {f"d{i}": f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(n)}
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": list(docs), "text": list(docs.values())}), corpus)
    queries = tmp_path / "q.parquet"
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(len(QUERIES))], "text": QUERIES}), queries)
    return docs, corpus, queries


def st_top_k(st, queries: list, docs: dict, k: int):
    """{query index: [(doc id, score)]} by ST's own MaxSim over its own embeddings."""
    ids = sorted(docs)
    scores = st.similarity(st.encode_query(queries), [docs[i] for i in ids]).numpy()
    return {q: [(ids[j], float(scores[q, j])) for j in sorted(range(len(ids)), key=lambda j: (-scores[q, j], ids[j]))[:k]]
            for q in range(len(queries))}


def read_hits(out):
    rows = pq.read_table(out).to_pylist()
    hits = {}
    for r in sorted(rows, key=lambda r: (r["query_id"], r["rank"])):
        hits.setdefault(r["query_id"], []).append((r["doc_id"], r["score"]))
    return hits


def test_search_is_exact_maxsim_equal_to_st(ray_session, tiny_colbert, st_models, tmp_path):
    st = st_models[tiny_colbert]
    docs, corpus, queries = text_corpus(tmp_path, 40)
    cdir = tmp_path / "c"
    assert run_job("pipelines.embed", ["--input", corpus, "--output", cdir, "--model", tiny_colbert]) == 0
    stored = read_vectors(cdir)
    want = st_top_k(st, QUERIES, {i: st.encode_document([docs[i]])[0] for i in docs}, 7)
    np.testing.assert_allclose(stored["d3"], st.encode_document([docs["d3"]], convert_to_numpy=True)[0], atol=1e-5)
    for name, extra in (("raw", ["--model", tiny_colbert]), ("blocks", ["--model", tiny_colbert, "--corpus-block-rows", 6,
                                                                      "--executor", "local"])):
        out = tmp_path / name
        assert run_job("pipelines.search", ["--queries", queries, "--corpus-embeddings", cdir, "--output", out,
                                            "--top-k", 7, *extra]) == 0
        hits = read_hits(out)
        for q, expected in want.items():
            got = hits[f"q{q}"]
            assert [d for d, _ in got] == [d for d, _ in expected], (name, q)
            np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], rtol=0, atol=1e-4)
        m = json.loads((out / "_manifest.json").read_text())
        assert m["model"]["similarity_fn_name"] == "maxsim" and m["model"]["multi_vector"]


def test_rerank_scores_pairs_by_maxsim_equal_to_st(ray_session, tiny_colbert, tiny_colqwen2, st_models, pages,
                                                   tmp_path):
    files = sorted(p for p in pages.iterdir() if p.name != "broken.png")
    cases = {
        # ColBERT on text pairs, in process; ColQwen2 with text queries against page images, on Ray.
        tiny_colbert: ([(q, f"d{j}", TEXTS[j]) for q in QUERIES[:3] for j in range(len(TEXTS))], "local"),
        tiny_colqwen2: ([(q, p.name, str(p)) for q in QUERIES[:2] for p in files]
                        + [(QUERIES[0], "broken.png", str(pages / "broken.png"))], "ray"),
    }
    for model, (pairs, executor) in cases.items():
        cand = tmp_path / f"{os.path.basename(model)}.parquet"
        qids = {q: f"q{i}" for i, q in enumerate(QUERIES)}
        pq.write_table(pa.table({"query_id": [qids[q] for q, _, _ in pairs], "query": [q for q, _, _ in pairs],
                                 "doc_id": [d for _, d, _ in pairs], "doc": [doc for _, _, doc in pairs]}), cand)
        out = tmp_path / f"out-{os.path.basename(model)}"
        assert run_job("pipelines.rerank", ["--candidates", cand, "--output", out, "--model", model,
                                            "--executor", executor, "--batch-size", 4]) == 0
        st = st_models[model]
        good = [(q, d, doc) for q, d, doc in pairs if d != "broken.png"]
        docs = [doc if model == tiny_colbert else Image.open(doc) for _, _, doc in good]
        want = st.similarity_pairwise(st.encode_query([q for q, _, _ in good]), st.encode_document(docs)).numpy()
        got = {(r["query_id"], r["doc_id"]): r for r in pq.read_table(out).to_pylist()}
        assert len(got) == len(good)
        for (q, d, _), score in zip(good, want):
            assert got[(qids[q], d)]["score"] == pytest.approx(float(score), abs=1e-4)
        for qid in {qids[q] for q, _, _ in good}:  # ranks by score within each query, 1 = best
            mine = sorted((r for r in got.values() if r["query_id"] == qid), key=lambda r: r["rank"])
            assert [r["score"] for r in mine] == sorted((r["score"] for r in mine), reverse=True)
        manifest = json.loads((out / "_manifest.json").read_text())
        assert manifest["model"]["kind"] == "multivector" and manifest["model"]["similarity_fn_name"] == "maxsim"
        if model == tiny_colqwen2:
            (err,) = pq.read_table(out / "_errors").to_pylist()
            assert "broken.png" in err["id"] and "undecodable" in err["error"]


def test_stores_hold_multi_vector_versions_and_the_gate_compares_them_with_single_vector(
        tiny_colbert, st_models, minilm_path, tmp_path, capsys):
    """reembed keeps a multi-vector version (incremental: unchanged records carried over, vectors equal to ST's),
    and the gate weighs it against a single-vector CURRENT on the same judgements, both ways."""
    from mmembed.errors import EXIT_NOT_BETTER
    from mmembed.stores.store import Store
    from mmembed.testing.judged import judged_set, write_beir

    beir = write_beir(tmp_path / "beir")
    store, local = tmp_path / "store", ["--executor", "local"]
    gate = ["--queries", beir["queries"], "--qrels", beir["qrels"], *local]
    assert run_job("pipelines.reembed", ["--input", beir["corpus"], "--store", store, "--model", minilm_path,
                                         *local]) == 0
    minilm = Store(str(store)).current()["path"]
    # The random ColBERT retrieves worse than MiniLM: kept out of CURRENT, the decision recorded.
    assert run_job("pipelines.reembed", ["--input", beir["corpus"], "--store", store, "--model", tiny_colbert,
                                         "--activate-if-better", *gate]) == EXIT_NOT_BETTER
    assert Store(str(store)).current()["path"] == minilm
    listing = {v["version"]: v for v in Store(str(store)).versions()}
    (colbert,) = [v for v in listing.values() if not v["current"]]
    decision = colbert["decision"]
    assert decision["activated"] is False and decision["candidate"]["value"] < decision["current"]["value"]
    capsys.readouterr()
    # Its snapshot holds ST's document vectors for every record, counted per record in its manifest.

    def latest():
        return store / Store(str(store)).latest(*colbert["version"].split("/")).path

    root = latest()
    corpus, _, _ = judged_set()
    got = read_vectors(root)
    want = dict(zip(corpus, st_models[tiny_colbert].encode_document(list(corpus.values()), convert_to_numpy=True)))
    assert_equal_to_st(got, want)
    manifest = json.loads((root / "_manifest.json").read_text())
    assert manifest["model"]["multi_vector"]["vectors"] == sum(len(v) for v in want.values())
    # Incremental: a rerun with one record changed embeds that one and carries the rest over, equal to ST.
    texts = dict(corpus)
    first = next(iter(texts))
    texts[first] = "a new text about paris and france"
    changed = tmp_path / "corpus2.parquet"
    pq.write_table(pa.table({"id": list(texts), "text": list(texts.values())}), changed)
    assert run_job("pipelines.reembed", ["--input", changed, "--store", store, "--model", tiny_colbert, *local]) == 0
    assert "0 new, 1 changed" in capsys.readouterr().out
    assert latest() != root
    want[first] = st_models[tiny_colbert].encode_document([texts[first]], convert_to_numpy=True)[0]
    assert_equal_to_st(read_vectors(latest()), want)
    # The reverse: with the multi-vector version CURRENT, MiniLM passes the gate.
    assert run_job("pipelines.activate", [store, colbert["version"]]) == 0
    single = next(v for v in listing.values() if v["current"])["version"]
    assert run_job("pipelines.activate", [store, single, "--if-better", *gate]) == 0
    assert Store(str(store)).current()["path"] == minilm


def test_evaluate_scores_maxsim_equal_to_st_multi_vector_evaluator(tiny_colbert, st_models, tmp_path):
    from sentence_transformers.multi_vector_encoder.evaluation import MultiVectorInformationRetrievalEvaluator

    from mmembed.testing.judged import judged_set, write_beir

    beir = write_beir(tmp_path / "beir")
    out = tmp_path / "corpus"
    assert run_job("pipelines.embed", ["--input", beir["corpus"], "--output", out, "--model", tiny_colbert,
                                       "--executor", "local"]) == 0
    metrics = tmp_path / "metrics.json"
    assert run_job("pipelines.evaluate", [out, "--queries", beir["queries"], "--qrels", beir["qrels"], "--json",
                                          metrics, "--executor", "local"]) == 0
    ours = json.loads(metrics.read_text())
    corpus, queries, qrels = judged_set()
    relevant = {}
    for q, d, s in qrels:
        if s > 0:
            relevant.setdefault(q, set()).add(d)
    ks = [1, 3, 5, 10, 100]
    ev = MultiVectorInformationRetrievalEvaluator(queries, corpus, relevant, mrr_at_k=ks, ndcg_at_k=ks,
                                                  accuracy_at_k=ks, precision_recall_at_k=ks, map_at_k=ks,
                                                  write_csv=False)
    ref = {k.split("_", 1)[1]: v for k, v in ev(st_models[tiny_colbert]).items() if k.startswith("maxsim_")}
    assert set(ours) == set(ref)
    assert max(abs(ours[k] - ref[k]) for k in ours) <= 1e-6, {k: (ours[k], ref[k]) for k in ours}
    assert 0 < ours["ndcg@10"] < 1  # a random model: neither perfect nor useless on this set


def test_readme_snippet_reads_token_vectors_and_scores_like_st(tiny_colbert, st_models, texts, tmp_path):
    """The README's "Multi-vector models" snippet, on a tiny model's output."""
    import re

    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme.split("### Multi-vector models", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    out = tmp_path / "out"
    assert run_job("pipelines.embed", ["--input", texts, "--output", out, "--model", tiny_colbert,
                                       "--executor", "local"]) == 0
    code = code.replace('"pages-colqwen/"', repr(str(out))).replace('"vidore/colqwen2-v1.0-hf"', repr(tiny_colbert))
    scope: dict = {}
    exec(compile(code, "README", "exec"), scope)
    st = st_models[tiny_colbert]
    ids = scope["table"].column("id").to_pylist()
    want = st.similarity(st.encode_query(["where is the invoice total?"]),
                         st.encode_document([TEXTS[int(i[1:])] for i in ids]))
    np.testing.assert_allclose(scope["scores"].numpy(), want.numpy(), rtol=0, atol=1e-4)


def test_token_index_search_finds_exact_maxsim_ranks(tiny_colbert, tmp_path):
    """`mmembed index` over token vectors, then `search --index`: candidates from the nearest tokens, ranked by
    exact MaxSim. With every token a candidate it is the exact search; with the default it stays close."""
    docs = {f"d{i}": f"{TEXTS[i % len(TEXTS)]} {i} {TEXTS[(i * 7) % len(TEXTS)]}" for i in range(120)}
    corpus, queries = tmp_path / "corpus.parquet", tmp_path / "q.parquet"
    pq.write_table(pa.table({"id": list(docs), "text": list(docs.values())}), corpus)
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(len(QUERIES))], "text": QUERIES}), queries)
    cdir, qdir = tmp_path / "c", tmp_path / "qe"
    local = ["--executor", "local"]
    assert run_job("pipelines.embed", ["--input", corpus, "--output", cdir, "--model", tiny_colbert, *local]) == 0
    assert run_job("pipelines.embed", ["--input", queries, "--output", qdir, "--model", tiny_colbert, "--task",
                                       "query", *local]) == 0
    exact = tmp_path / "exact"
    assert run_job("pipelines.search", ["--queries", qdir, "--corpus-embeddings", cdir, "--output", exact,
                                        "--top-k", 10, *local]) == 0
    for kind in ("flat", "ivf-flat", "hnsw"):
        idx = tmp_path / f"idx-{kind}"
        extra = ["--nlist", 8] if kind == "ivf-flat" else []
        assert run_job("pipelines.index", ["--embeddings", cdir, "--output", idx, "--kind", kind, *extra]) == 0
        m = json.loads((idx / "_manifest.json").read_text())
        assert m["multi_vector"]["index_vectors"] == m["multi_vector"]["vectors"] and m["counts"]["written"] == 120
        everything = tmp_path / f"all-{kind}"
        wide = ["--nprobe", 8] if kind == "ivf-flat" else (["--ef-search", 4096] if kind == "hnsw" else [])
        assert run_job("pipelines.search", ["--queries", qdir, "--index", idx, "--output", everything, "--top-k", 10,
                                            "--candidate-tokens", 100_000, *wide, *local]) == 0
        want, got = read_hits(exact), read_hits(everything)
        assert [d for q in sorted(want) for d, _ in want[q]] == [d for q in sorted(got) for d, _ in got[q]], kind
        np.testing.assert_allclose([s for q in sorted(want) for _, s in want[q]],
                                   [s for q in sorted(got) for _, s in got[q]], atol=1e-4)
    default = tmp_path / "default"
    assert run_job("pipelines.search", ["--queries", qdir, "--index", tmp_path / "idx-ivf-flat", "--output", default,
                                        "--top-k", 10, *local]) == 0
    got = read_hits(default)
    recall = np.mean([len({d for d, _ in got[q]} & {d for d, _ in want[q]}) / 10 for q in want])
    assert recall >= 0.8, recall
    for q in got:  # whatever it finds, it scores exactly
        exact_scores = dict(want[q])
        for d, s in got[q]:
            if d in exact_scores:
                assert s == pytest.approx(exact_scores[d], abs=1e-4)


def test_retrieve_rerank_with_multi_vector_models_equals_st(ray_session, tiny_colbert, st_models, tmp_path):
    """The whole retrieve-rerank job with a multi-vector embedder (exact MaxSim retrieval) and the same model as
    reranker (MaxSim of each pair): the candidates are ST's top --retrieve-k and the reranked rows ST's top
    --top-k of them, scores equal to ST's similarity_pairwise."""
    st = st_models[tiny_colbert]
    docs, corpus, queries = text_corpus(tmp_path, 30)
    out = tmp_path / "rr"
    assert run_job("pipelines.retrieve_rerank", [
        "--queries", queries, "--corpus", corpus, "--embedder", tiny_colbert, "--reranker", tiny_colbert,
        "--retrieve-k", 6, "--top-k", 3, "--output", out]) == 0
    want = st_top_k(st, QUERIES, {i: st.encode_document([docs[i]])[0] for i in docs}, 6)
    candidates = read_hits(out / "candidates")
    reranked = read_hits(out / "reranked")
    q_emb = st.encode_query(QUERIES)
    for q, expected in want.items():
        assert [d for d, _ in candidates[f"q{q}"]] == [d for d, _ in expected], q
        pairs = [(d, float(st.similarity_pairwise([q_emb[q]], st.encode_document([docs[d]]))[0]))
                 for d, _ in expected]
        top = sorted(pairs, key=lambda p: (-p[1], p[0]))[:3]
        got = reranked[f"q{q}"]
        assert [d for d, _ in got] == [d for d, _ in top], q
        np.testing.assert_allclose([s for _, s in got], [s for _, s in top], rtol=0, atol=1e-4)
    m = json.loads((out / "corpus_embeddings" / "_manifest.json").read_text())
    assert m["model"]["multi_vector"]["task"] == "document"
