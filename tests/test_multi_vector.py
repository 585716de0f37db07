"""Multi-vector (late-interaction) models: sentence-transformers 6's MultiVectorEncoder.

Until a command runs them, each refuses them before anything runs: loaded as a SentenceTransformer, a
ColBERT-style checkpoint falls back to mean pooling without its projection or mask (wrong vectors,
exit 0), and a ColQwen2 one fails on its configuration class.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmembed.models.loading import MULTI_VECTOR, ModelSpec, model_family
from tests.conftest import run_job


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("mv_texts")
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["a cat on the road", "the dog, and a bird!"]}), d / "t.parquet")
    return d / "t.parquet"


def test_family_is_read_as_sentence_transformers_reads_it(tiny_colbert, tiny_colqwen2, tiny_clip, tiny_cross_encoder):
    from sentence_transformers import MultiVectorEncoder

    assert model_family(ModelSpec(tiny_colbert)) == MULTI_VECTOR
    assert model_family(ModelSpec(tiny_colqwen2)) == MULTI_VECTOR  # no ST files: by its ForRetrieval architecture
    assert model_family(ModelSpec(tiny_clip)) == "SentenceTransformer"
    assert model_family(ModelSpec(tiny_cross_encoder)) == "CrossEncoder"
    for path in (tiny_colbert, tiny_colqwen2):
        assert len(MultiVectorEncoder(path, device="cpu").encode_document(["a cat"])[0].shape) == 2


def test_embed_refuses_a_multi_vector_model_before_anything_runs(tiny_colbert, tiny_colqwen2, texts, tmp_path, capsys):
    for path in (tiny_colbert, tiny_colqwen2):
        out = tmp_path / os.path.basename(path)
        assert run_job("pipelines.embed", ["--input", texts, "--output", out, "--model", path, "--executor", "local"]) == 2
        err = capsys.readouterr().err
        assert "multi-vector" in err and "MaxSim" in err, err
        assert not out.exists()


def test_rerank_refuses_a_multi_vector_model(tiny_colbert, tmp_path, capsys):
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"query_id": ["q"], "query": ["a cat"], "doc_id": ["d"], "doc": ["the cat"]}), pairs)
    out = tmp_path / "scores"
    assert run_job("pipelines.rerank", ["--candidates", pairs, "--output", out, "--model", tiny_colbert, "--executor", "local"]) == 2
    assert "multi-vector" in capsys.readouterr().err
    assert not out.exists()
