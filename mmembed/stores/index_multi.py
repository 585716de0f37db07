"""Approximate MaxSim search over multi-vector corpora: candidates from a token index, then exact MaxSim.

ColBERT's own end-to-end retrieval, in the style PLAID refines: every stored token vector goes into one
FAISS index (row r = the r-th token, documents' tokens contiguous and in shard order); a query's tokens
each fetch their nearest `candidate_tokens` token rows; the documents those rows belong to are the
candidates, and only they are scored with exact MaxSim (ST's own function) on their exact stored vectors,
read back from the index itself. So a document found by any one of its tokens is ranked exactly as the
exhaustive scan ranks it; recall is lost only on documents none of whose tokens come near any query token.

    <output>/index-<token>.faiss    the token index (flat, ivf-flat or hnsw: kinds that hold the exact vectors)
    <output>/ids-<token>.parquet    `id` and `offset`: document d's tokens are rows offset[d] .. offset[d+1]
    <output>/_manifest.json         as for single-vector indexes, with `multi_vector` set
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from mmembed.errors import UsageError
from mmembed.stores.index import IVF_KINDS, EmbeddingSource, IndexParams, require_faiss

# Kinds whose stored vectors are the exact ones, so candidates are rescored exactly from the index.
MULTI_VECTOR_KINDS = ("flat", "ivf-flat", "hnsw")
MAXSIM_SIMILARITIES = ("maxsim", "meanmaxsim")
# Nearest token rows fetched per query token (--candidate-tokens): the recall/speed knob of the search.
CANDIDATE_TOKENS = 32


def token_count(source: EmbeddingSource) -> int:
    return int(source.model["multi_vector"]["vectors"])


def token_shards(source: EmbeddingSource):
    """(doc ids, float32 [tokens, dim], tokens per doc) per shard, in the manifest's order."""
    import pyarrow.parquet as pq

    from mmembed.stages.search_maxsim import flat_vectors
    from mmembed.storage.fs import filesystem, join_uri, with_retries

    for entry in source.files:
        fs, path = filesystem(join_uri(source.root, entry["name"]), source.storage_options)

        def read(fs=fs, path=path):
            with fs.open(path, "rb") as f:
                return pq.read_table(f, columns=["id", "embedding"])

        t = with_retries(read)
        vectors, counts = flat_vectors(t.column("embedding"), source.dim)
        yield t.column("id").combine_chunks().cast(pa.string()), vectors, counts


class MultiVectorIndexBuilder:
    """Trains a token index on a uniform sample of the corpus's tokens, then adds them shard by shard."""

    def __init__(self, source: EmbeddingSource, params: IndexParams):
        self.faiss = require_faiss()
        self.source = source
        if source.similarity not in MAXSIM_SIMILARITIES:
            raise UsageError(f"multi-vector similarity {source.similarity!r} is not MaxSim; use exact search.")
        self.metric = "inner_product"  # MaxSim is built on token dot products
        self.normalize = False
        self.params = params.resolve(token_count(source), source.dim)
        if self.params.kind not in MULTI_VECTOR_KINDS:
            raise UsageError(
                f"--kind {self.params.kind} stores approximate vectors; a multi-vector index rescores its candidates "
                f"exactly from the index, so it takes {', '.join(MULTI_VECTOR_KINDS)}."
            )

    def _empty(self):
        faiss, p, d = self.faiss, self.params, self.source.dim
        if p.kind == "flat":
            return faiss.IndexFlatIP(d)
        if p.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, p.m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = p.ef_construction
            return index
        return faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, p.nlist, faiss.METRIC_INNER_PRODUCT)

    def _sample(self, size: int, seed: int = 0) -> np.ndarray:
        total = token_count(self.source)
        rng = np.random.default_rng(seed)
        parts = []
        for _, vectors, _ in token_shards(self.source):
            take = rng.random(len(vectors)) < size / total
            parts.append(vectors[take])
        return np.ascontiguousarray(np.concatenate(parts)[:size])

    def build(self):
        """(the FAISS index, a table of doc `id` and `offset` of its first token row)."""
        index = self._empty()
        if not index.is_trained:
            index.train(self._sample(self.params.train_size))
        ids, offsets, start = [], [], 0
        for doc_ids, vectors, counts in token_shards(self.source):
            index.add(np.ascontiguousarray(vectors))
            ids.append(doc_ids)
            offsets.append(start + np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64))
            start += int(counts.sum())
        if self.params.kind in IVF_KINDS:
            index.make_direct_map()  # rows -> their exact vectors, for the exact MaxSim of the candidates
        return index, pa.table({"id": pa.concat_arrays(ids), "offset": pa.array(np.concatenate(offsets))})


class MultiVectorAnnIndex:
    """A token index with its documents: top-k (scores, doc ids) for multi-vector queries."""

    def __init__(self, index, table: pa.Table, params: dict, similarity: str, candidate_tokens: int = CANDIDATE_TOKENS):
        from sentence_transformers.util import SimilarityFunction

        self.faiss = require_faiss()
        self.index, self.params = index, params
        self.ids = table.column("id").combine_chunks()
        self.starts = table.column("offset").to_numpy()
        self.ends = np.append(self.starts[1:], index.ntotal)
        self.similarity = SimilarityFunction.to_similarity_fn(similarity)
        self.candidate_tokens = candidate_tokens

    def tune(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        if self.params["kind"] in IVF_KINDS:
            self.index.nprobe = min(nprobe or self.params["nprobe"], self.params["nlist"])
        elif self.params["kind"] == "hnsw":
            self.index.hnsw.efSearch = ef_search or self.params["ef_search"]

    def candidates(self, queries: list[np.ndarray], k: int) -> list[np.ndarray]:
        """Each query's candidate documents (ordinals): those owning a nearest token of any query token.

        A query whose nearest tokens fall in fewer than k documents fetches twice as many tokens, until it
        has k candidates or has fetched every token, so every query gets k hits where the corpus has them."""
        out: list = [None] * len(queries)
        todo, fetch = list(range(len(queries))), self.candidate_tokens
        want = min(k, len(self.starts))
        while todo:
            fetch = min(fetch, self.index.ntotal)
            flat = np.ascontiguousarray(np.concatenate([queries[i] for i in todo]), dtype=np.float32)
            _, rows = self.index.search(flat, fetch)
            short, start = [], 0
            for i in todo:
                found = rows[start:start + len(queries[i])]
                start += len(queries[i])
                out[i] = np.unique(np.searchsorted(self.starts, found[found >= 0], side="right") - 1)
                if len(out[i]) < want and fetch < self.index.ntotal:
                    short.append(i)
            todo, fetch = short, 2 * fetch
        return out

    def vectors(self, docs: np.ndarray) -> list[np.ndarray]:
        """The exact stored vectors of documents (by ordinal), read back from the index."""
        counts = self.ends[docs] - self.starts[docs]
        rows = np.concatenate([np.arange(s, e) for s, e in zip(self.starts[docs], self.ends[docs])]) if len(docs) \
            else np.zeros(0, np.int64)
        flat = self.index.reconstruct_batch(rows.astype(np.int64)) if len(rows) else np.zeros((0, self.index.d),
                                                                                                np.float32)
        return np.split(flat, np.cumsum(counts)[:-1])

    def search(self, queries: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        """([nq, k] exact MaxSim scores of the best candidates, [nq, k] doc ids); -inf and None where a query
        has fewer than k candidates."""
        import torch

        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        doc_ids = np.full((len(queries), k), None, dtype=object)
        for i, (q, docs) in enumerate(zip(queries, self.candidates(queries, k))):
            if not len(docs):
                continue
            exact = self.similarity([torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))],
                                    [torch.from_numpy(v) for v in self.vectors(docs)])[0].numpy()
            top = np.argsort(-exact, kind="stable")[:k]
            scores[i, :len(top)] = exact[top]
            doc_ids[i, :len(top)] = np.asarray(self.ids.take(pa.array(docs[top])).to_pylist(), dtype=object)
        return scores, doc_ids
