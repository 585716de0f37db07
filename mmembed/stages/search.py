"""The retrieve step: exact top-k of query embeddings against corpus embedding shards.

Each actor takes a batch of query embeddings and streams the corpus shards written by
`mmembed embed` through the device one block at a time, keeping only a running top-k per
query. Memory is one query batch x one corpus block of scores plus k ids per query; neither
the corpus nor the full score matrix is ever held. Scores are ST's own similarity function
(`SimilarityFunction.to_similarity_fn`, as named in the corpus manifest), on the GPU when the
actor has one. Results are ordered by score descending, ties by doc_id ascending; at the
k-th place, which of several exactly tied documents is kept is not specified.

A quantised corpus (`mmembed embed --precision int8|uint8|binary|ubinary`) is searched as ST's
semantic_search_faiss/usearch do: the float queries are quantised with ST's quantize_embeddings
and the corpus manifest's ranges; int8/uint8 scores are dot products of the quantised vectors,
binary/ubinary scores are minus the Hamming distance (higher is better, as every other score
here). When the corpus also stores float vectors (`--keep-float`), the best
rescore_multiplier x k hits by quantised score are rescored with the float queries and the
corpus similarity function, and the best k of those are kept, with their float scores.
"""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmembed.models.loading import resolve_device
from mmembed.schema import embedding_matrix
from mmembed.stages.rank import RANKED_SCHEMA
from mmembed.storage.fs import filesystem

# Search writes what rerank writes, so `mmembed rerank` takes its output directly.
SEARCH_SCHEMA = RANKED_SCHEMA

QUERY_SCHEMA_NAMES = ["id", "embedding", "stage", "error"]


def as_query_rows(table: pa.Table, multi_vector: bool = False) -> pa.Table:
    """Query embedding rows or query error rows (from an embed job's _errors) in one layout; a
    multi-vector query's embedding is a list of vectors."""
    n = table.num_rows
    vector = pa.list_(pa.list_(pa.float32())) if multi_vector else pa.list_(pa.float32())
    cols = {}
    for name in QUERY_SCHEMA_NAMES:
        if name in table.column_names:
            cols[name] = table.column(name)
        elif name == "embedding":
            cols[name] = pa.nulls(n, vector)
        else:
            cols[name] = pa.nulls(n, pa.string())
    return pa.table(cols).cast(
        pa.schema([("id", pa.string()), ("embedding", vector), ("stage", pa.string()), ("error", pa.string())])
    )


def stored_matrix(col, width: int) -> np.ndarray:
    """A fixed-size list column of quantised vectors in its own integer dtype, [rows, width]."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return np.asarray(col.flatten()).reshape(len(col), width)


def unpacked_bits(packed: np.ndarray, precision: str) -> np.ndarray:
    """binary (int8, packbits - 128 as ST stores it) or ubinary (uint8) rows as 0/1 float32 bits."""
    raw = packed.view(np.uint8) ^ 0x80 if precision == "binary" else packed.view(np.uint8)
    return np.unpackbits(raw, axis=-1).astype(np.float32)


class SearchStage:
    """GPU (or CPU) actor: query embedding rows in, k result rows per query (or its error row) out."""

    def __init__(
        self,
        corpus_files: list[str],
        *,
        dim: int,
        top_k: int,
        similarity_fn_name: str = "cosine",
        storage_options: dict | None = None,
        block_rows: int = 16_384,
        device: str = "auto",
        quantization: dict | None = None,
        rescore_multiplier: int = 4,
    ):
        import torch
        from sentence_transformers.util import SimilarityFunction

        self.torch = torch
        self.device = torch.device(resolve_device(device))
        self.similarity = SimilarityFunction.to_similarity_fn(similarity_fn_name)
        self.corpus_files = corpus_files
        self.dim = dim
        self.top_k = top_k
        self.storage_options = storage_options or {}
        self.block_rows = block_rows
        q = quantization or {}
        self.precision = q.get("precision", "float32")
        self.quantized = self.precision in ("int8", "uint8", "binary", "ubinary")
        self.ranges = np.asarray(q["ranges"], dtype=np.float32) if q.get("ranges") is not None else None
        self.width = q.get("stored_dim", dim)
        self.float_column = q.get("float_column") if self.quantized and rescore_multiplier else None
        self.keep = top_k * rescore_multiplier if self.float_column else top_k

    def corpus_blocks(self):
        """(doc ids, [rows, width] stored vectors, [rows, dim] float32 or None) per corpus block, shard after shard."""
        columns = ["id", "embedding"] + ([self.float_column] if self.float_column else [])
        for uri in self.corpus_files:
            fs, path = filesystem(uri, self.storage_options)
            with fs.open(path, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=self.block_rows, columns=columns):
                    ids = np.asarray(batch.column(0).to_pylist(), dtype=object)
                    if self.quantized:
                        stored = stored_matrix(batch.column(1), self.width)
                    else:
                        stored = embedding_matrix(batch.column(1), self.dim)
                    floats = embedding_matrix(batch.column(2), self.dim) if self.float_column else None
                    yield ids, stored, floats

    def query_vectors(self, column) -> np.ndarray:
        """The queries' float vectors from their embedding column."""
        return embedding_matrix(column, self.dim)

    def prepare_queries(self, queries: np.ndarray):
        """Float queries as the tensor `score` compares with stored corpus blocks."""
        torch = self.torch
        if not queries.flags.writeable:  # a view of an Arrow buffer; torch wants memory it may write
            queries = queries.copy()
        if not self.quantized:
            return torch.from_numpy(queries).to(self.device)
        from mmembed.stages.encode import quantize

        stored = quantize(queries, self.precision, self.ranges)
        if self.precision in ("binary", "ubinary"):
            return torch.from_numpy(unpacked_bits(stored, self.precision)).to(self.device)
        # float64: uint8 dot products pass float32's exact-integer range (2^24) from ~260 dims on.
        return torch.from_numpy(stored.astype(np.float64)).to(self.device)

    def score(self, q, block: np.ndarray):
        """[nq, rows] scores of prepared queries against one stored corpus block; higher is better."""
        torch = self.torch
        if not self.quantized:
            with warnings.catch_warnings():
                # A view of the shard's Arrow buffer, only read: copying each block would cost a pass over memory.
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                corpus = torch.from_numpy(block)
            return self.similarity(q, corpus.to(self.device)).float()
        if self.precision in ("binary", "ubinary"):
            bits = torch.from_numpy(unpacked_bits(block, self.precision)).to(self.device)
            hamming = q.sum(1, keepdim=True) + bits.sum(1)[None, :] - 2 * (q @ bits.T)
            return (-hamming).double()
        return q @ torch.from_numpy(block.astype(np.float64)).to(self.device).T

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the whole corpus: ([nq, k'] scores, [nq, k'] doc ids), k' = min(k, corpus)."""
        torch = self.torch
        q = self.prepare_queries(queries)
        qf = torch.from_numpy(queries.copy()).to(self.device) if self.float_column else None
        dtype = torch.float64 if self.quantized else torch.float32
        best = torch.empty((len(queries), 0), dtype=dtype, device=self.device)
        best_float = torch.empty((len(queries), 0), dtype=torch.float32, device=self.device)
        best_ids = np.empty((len(queries), 0), dtype=object)
        with torch.inference_mode():
            for ids, block, floats in self.corpus_blocks():
                merged = torch.cat([best, self.score(q, block)], dim=1)
                top = torch.topk(merged, min(self.keep, merged.shape[1]), dim=1)
                if qf is not None:
                    # The float scores of the candidates travel with them, so rescoring needs no second pass.
                    exact = self.similarity(qf, torch.from_numpy(floats).to(self.device)).float()
                    best_float = torch.cat([best_float, exact], dim=1).gather(1, top.indices)
                best_ids = self._merge_ids(best_ids, ids, top.indices.cpu().numpy())
                best = top.values
            if qf is not None:
                top = torch.topk(best_float, min(self.top_k, best_float.shape[1]), dim=1)
                best, best_ids = top.values, np.take_along_axis(best_ids, top.indices.cpu().numpy(), axis=1)
        return best.cpu().numpy(), best_ids

    @staticmethod
    def _merge_ids(best_ids: np.ndarray, ids: np.ndarray, picked: np.ndarray) -> np.ndarray:
        """Doc ids of the picked columns of [kept ids | this block's ids]."""
        kept = best_ids.shape[1]
        from_block = picked >= kept
        new_ids = np.empty(picked.shape, dtype=object)
        if kept:
            old = np.take_along_axis(best_ids, np.minimum(picked, kept - 1), axis=1)
            new_ids[~from_block] = old[~from_block]
        new_ids[from_block] = ids[picked[from_block] - kept]
        return new_ids

    multi_vector = False

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch = as_query_rows(batch, self.multi_vector)
        error = batch.column("error").to_pylist()
        emb = batch.column("embedding")
        ok = [i for i, e in enumerate(error) if e is None and emb[i].is_valid]
        out = {name: [] for name in SEARCH_SCHEMA.names}
        ids = batch.column("id").to_pylist()
        stage = batch.column("stage").to_pylist()
        if ok:
            scores, doc_ids = self.search(self.query_vectors(emb.take(ok)))
            for row, i in enumerate(ok):
                order = sorted(range(scores.shape[1]), key=lambda j: (-scores[row, j], doc_ids[row, j]))
                for rank, j in enumerate(order, start=1):
                    self._append(out, ids[i], doc_ids[row, j], float(scores[row, j]), rank, None, None)
        done = set(ok)
        for i, e in enumerate(error):
            if i in done:
                continue
            reason = e or "query has no embedding"
            self._append(out, ids[i], None, None, None, stage[i] or "search", reason)
        return pa.table(out, schema=SEARCH_SCHEMA)

    @staticmethod
    def _append(out, query_id, doc_id, score, rank, stage, error):
        for name, value in zip(SEARCH_SCHEMA.names, (query_id, query_id, doc_id, score, rank, stage, error)):
            out[name].append(value)
