"""Approximate MaxSim search over multi-vector corpora: candidates from a token index, then exact MaxSim.

ColBERT's own end-to-end retrieval: every stored token vector goes into one FAISS index (row r = the r-th
token, documents' tokens contiguous and in shard order); a query's vectors each fetch their nearest
`candidate_tokens` token rows; the documents those rows belong to are the candidates, and only they are
scored with exact MaxSim (ST's definition, in one product over their vectors) on their stored vectors, read
from a document-ordered copy. So a document found by any one of its tokens is ranked exactly as the
exhaustive scan ranks it; recall is lost only on documents none of whose tokens come near a query vector.

    <output>/index-<token>.faiss    the token index, for candidates only (any kind: ivf-sq8 and ivf-pq are small)
    <output>/ids-<token>.parquet    `id` and `offset`: document d's tokens are rows offset[d] .. offset[d+1]
    <output>/vectors-<token>.npy    every token vector in document order, in the corpus's precision; memory-mapped
                                    by a search, so only candidates' rows are read
    <output>/_manifest.json         as for single-vector indexes, with `multi_vector` set
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from mmembed.errors import UsageError
from mmembed.stores.index import IVF_KINDS, AnnIndex, EmbeddingSource, IndexBuilder, IndexParams, require_faiss

MAXSIM_SIMILARITIES = ("maxsim", "meanmaxsim")
# Nearest token rows fetched per query token (--candidate-tokens), and the default index: measured on 100,000
# synthetic clustered pages (6.4M token vectors; benchmarks/RESULTS.md, "Multi-vector search"): ivf-sq8 with
# about 4 x sqrt(N) lists, nlist/128 of them probed, 128 candidate tokens: recall@10 0.970 at 14.6x exact MaxSim.
CANDIDATE_TOKENS = 128
NPROBE_SHARE = 128


def multi_vector_params(params: IndexParams, n: int, dim: int) -> IndexParams:
    """The token index's parameters: the given ones, else the measured defaults for n token vectors."""
    import math
    from dataclasses import replace

    from mmembed.stores.index import FLAT_BELOW

    ivf_given = params.nlist or params.nprobe or params.train_size
    kind = params.kind or ("ivf-sq8" if ivf_given or n >= FLAT_BELOW else "flat")
    if kind in IVF_KINDS:
        nlist = params.nlist or max(1, min(2 ** round(math.log2(4 * math.sqrt(n))), n // 39))
        params = replace(params, kind=kind, nlist=nlist, nprobe=params.nprobe or max(1, nlist // NPROBE_SHARE))
    else:
        params = replace(params, kind=kind)
    return params.resolve(n, dim)


def token_count(source: EmbeddingSource) -> int:
    return int(source.model["multi_vector"]["vectors"])


def token_shards(source: EmbeddingSource):
    """(doc ids, float32 [tokens, dim], tokens per doc) per shard, in the manifest's order."""
    import pyarrow.parquet as pq

    from mmembed.schema import flat_vectors
    from mmembed.storage.fs import filesystem, join_uri, with_retries

    for entry in source.files:
        fs, path = filesystem(join_uri(source.root, entry["name"]), source.storage_options)

        def read(fs=fs, path=path):
            with fs.open(path, "rb") as f:
                return pq.read_table(f, columns=["id", "embedding"])

        t = with_retries(read)
        vectors, counts = flat_vectors(t.column("embedding"), source.dim)
        yield t.column("id").combine_chunks().cast(pa.string()), vectors, counts


class MultiVectorIndexBuilder(IndexBuilder):
    """Trains a token index on a uniform sample of the corpus's tokens, then adds them shard by shard, writing
    the document-ordered vectors beside it (into `workdir`, which the caller keeps until the commit)."""

    def __init__(self, source: EmbeddingSource, params: IndexParams, workdir: str):  # noqa: D107 - not IndexBuilder's
        self.faiss = require_faiss()
        self.source = source
        if source.similarity not in MAXSIM_SIMILARITIES:
            raise UsageError(f"multi-vector similarity {source.similarity!r} is not MaxSim; use exact search.")
        self.metric = "inner_product"  # MaxSim is built on token dot products
        self.normalize = False
        self.params = multi_vector_params(params, token_count(source), source.dim)
        self.workdir = workdir
        self.dtype = np.float16 if source.model.get("precision") == "float16" else np.float32

    def _sample(self, size: int, seed: int = 0) -> np.ndarray:
        total = token_count(self.source)
        rng = np.random.default_rng(seed)
        parts = []
        for _, vectors, _ in token_shards(self.source):
            take = rng.random(len(vectors)) < size / total
            parts.append(vectors[take])
        return np.ascontiguousarray(np.concatenate(parts)[:size])

    def build(self):
        """(the FAISS index, a table of doc `id` and `offset` of its first token row, the vectors file)."""
        import os

        index = self._empty()
        if not index.is_trained:
            index.train(self._sample(self.params.train_size))
        path = os.path.join(self.workdir, "vectors.npy")
        total = token_count(self.source)
        store = np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype, shape=(total, self.source.dim))
        ids, offsets, start = [], [], 0
        for doc_ids, vectors, counts in token_shards(self.source):
            if start + len(vectors) > total:
                raise UsageError(f"{self.source.uri} holds more token vectors than its manifest counts ({total:,}); "
                                 "it was changed after it was written.")
            index.add(np.ascontiguousarray(vectors))
            store[start:start + len(vectors)] = vectors
            ids.append(doc_ids)
            offsets.append(start + np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64))
            start += int(counts.sum())
        store.flush()
        del store
        table = pa.table({"id": pa.concat_arrays(ids), "offset": pa.array(np.concatenate(offsets))})
        return index, table, path


class MultiVectorAnnIndex:
    """A token index, its documents and their vectors: top-k (scores, doc ids) for multi-vector queries."""

    def __init__(self, index, table: pa.Table, vectors: np.ndarray, params: dict, similarity: str,
                 candidate_tokens: int = CANDIDATE_TOKENS):
        self.faiss = require_faiss()
        self.index, self.params, self.vectors = index, params, vectors
        self.ids = table.column("id").combine_chunks()
        self.starts = table.column("offset").to_numpy()
        self.ends = np.append(self.starts[1:], len(vectors))
        if similarity not in MAXSIM_SIMILARITIES:
            raise UsageError(f"a multi-vector index scores with MaxSim; its corpus similarity is {similarity!r}")
        self.mean = similarity == "meanmaxsim"
        self.candidate_tokens = candidate_tokens

    @classmethod
    def load(cls, uri: str, storage_options: dict | None = None, *, nprobe: int | None = None,
             ef_search: int | None = None) -> "MultiVectorAnnIndex":
        """The committed token index at uri in memory, its vectors copied to local disk for the life of the
        process and memory-mapped: a search reads only its candidates' rows."""
        import tempfile

        from mmembed.stores.index import fetch_index

        manifest, index, table, local_copy = fetch_index(uri, storage_options)
        if not manifest.get("multi_vector"):
            raise UsageError(f"--index {uri} is a single-vector index; the corpus and queries are multi-vector.")
        vectors = np.load(local_copy("vectors", tempfile.mkdtemp(prefix="mmembed-vectors-")), mmap_mode="r")
        ann = cls(index, table, vectors, manifest["index"], manifest["similarity_fn_name"])
        ann.tune(nprobe=nprobe, ef_search=ef_search)
        return ann

    tune = AnnIndex.tune  # the same search-time settings (nprobe, efSearch) on the token index

    def candidates(self, queries: list[np.ndarray], k: int) -> list[np.ndarray]:
        """Each query's candidate documents (ordinals): those owning a nearest token of any of its vectors.

        A query whose fetched tokens fall in fewer than k documents fetches twice as many tokens, until it has
        k candidates or has fetched every token, so every query gets k hits where the corpus has them."""
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
                docs = np.unique(np.searchsorted(self.starts, found[found >= 0], side="right") - 1)
                out[i] = docs[self.ends[docs] > self.starts[docs]]
                if len(out[i]) < want and fetch < self.index.ntotal:
                    short.append(i)
            todo, fetch = short, 2 * fetch
        return out

    def maxsim(self, q: np.ndarray, docs: np.ndarray) -> np.ndarray:
        """Exact MaxSim of one query against documents, as ST's `maxsim` defines it (each query vector's best
        dot product over a document's vectors, summed; MeanMaxSim divides by the query's vectors), in one
        product over the documents' stored vectors rather than a padded batch."""
        counts = self.ends[docs] - self.starts[docs]
        first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        rows = np.repeat(self.starts[docs] - first, counts) + np.arange(int(counts.sum()))
        flat = np.asarray(self.vectors[rows], dtype=np.float32)
        best = np.maximum.reduceat(np.ascontiguousarray(q, dtype=np.float32) @ flat.T, first, axis=1)
        score = best.sum(axis=0)
        return score / len(q) if self.mean else score

    def search(self, queries: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        """([nq, k] exact MaxSim scores of the best candidates, [nq, k] doc ids); -inf and None where a query
        has fewer than k candidates."""
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        doc_ids = np.full((len(queries), k), None, dtype=object)
        for i, (q, docs) in enumerate(zip(queries, self.candidates(queries, k))):
            if not len(docs):
                continue
            exact = self.maxsim(q, docs)
            top = np.argsort(-exact, kind="stable")[:k]
            scores[i, :len(top)] = exact[top]
            doc_ids[i, :len(top)] = np.asarray(self.ids.take(pa.array(docs[top])).to_pylist(), dtype=object)
        return scores, doc_ids
