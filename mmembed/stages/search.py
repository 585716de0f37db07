"""The retrieve step: exact top-k of query embeddings against corpus embedding shards.

Each actor takes a batch of query embeddings and streams the corpus shards written by
`mmembed embed` through the device one block at a time, keeping only a running top-k per
query. Memory is one query batch x one corpus block of scores plus k ids per query; neither
the corpus nor the full score matrix is ever held. Scores are ST's own similarity function
(`SimilarityFunction.to_similarity_fn`, as named in the corpus manifest), on the GPU when the
actor has one. Results are ordered by score descending, ties by doc_id ascending; at the
k-th place, which of several exactly tied documents is kept is not specified.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmembed.models import resolve_device
from mmembed.stages.rank import RANKED_SCHEMA
from mmembed.storage import filesystem

# Search writes what rerank writes, so `mmembed rerank` takes its output directly.
SEARCH_SCHEMA = RANKED_SCHEMA

QUERY_SCHEMA_NAMES = ["id", "embedding", "stage", "error"]


def embedding_matrix(col, dim: int) -> np.ndarray:
    """A (fixed-size) list column of vectors as a float32 [rows, dim] array."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return np.asarray(col.flatten(), dtype=np.float32).reshape(len(col), dim)


def as_query_rows(table: pa.Table) -> pa.Table:
    """Query embedding rows or query error rows (from an embed job's _errors) in one layout."""
    n = table.num_rows
    cols = {}
    for name in QUERY_SCHEMA_NAMES:
        if name in table.column_names:
            cols[name] = table.column(name)
        elif name == "embedding":
            cols[name] = pa.nulls(n, pa.list_(pa.float32()))
        else:
            cols[name] = pa.nulls(n, pa.string())
    if not pa.types.is_list(cols["embedding"].type):
        cols["embedding"] = cols["embedding"].cast(pa.list_(pa.float32()))
    return pa.table(cols).cast(
        pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32())), ("stage", pa.string()), ("error", pa.string())])
    )


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

    def corpus_blocks(self):
        """(doc ids, [rows, dim] float32) per corpus block, shard after shard."""
        for uri in self.corpus_files:
            fs, path = filesystem(uri, self.storage_options)
            with fs.open(path, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=self.block_rows, columns=["id", "embedding"]):
                    ids = np.asarray(batch.column(0).to_pylist(), dtype=object)
                    yield ids, embedding_matrix(batch.column(1), self.dim)

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the whole corpus: ([nq, k'] scores, [nq, k'] doc ids), k' = min(k, corpus)."""
        torch = self.torch
        q = torch.from_numpy(queries).to(self.device)
        best = torch.empty((len(queries), 0), dtype=torch.float32, device=self.device)
        best_ids = np.empty((len(queries), 0), dtype=object)
        with torch.inference_mode():
            for ids, block in self.corpus_blocks():
                scores = self.similarity(q, torch.from_numpy(block).to(self.device)).float()
                merged = torch.cat([best, scores], dim=1)
                top = torch.topk(merged, min(self.top_k, merged.shape[1]), dim=1)
                picked = top.indices.cpu().numpy()
                kept = best_ids.shape[1]
                from_block = picked >= kept
                new_ids = np.empty(picked.shape, dtype=object)
                if kept:
                    old = np.take_along_axis(best_ids, np.minimum(picked, kept - 1), axis=1)
                    new_ids[~from_block] = old[~from_block]
                new_ids[from_block] = ids[picked[from_block] - kept]
                best, best_ids = top.values, new_ids
        return best.cpu().numpy(), best_ids

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch = as_query_rows(batch)
        error = batch.column("error").to_pylist()
        emb = batch.column("embedding")
        ok = [i for i, e in enumerate(error) if e is None and emb[i].is_valid]
        out = {name: [] for name in SEARCH_SCHEMA.names}
        ids = batch.column("id").to_pylist()
        stage = batch.column("stage").to_pylist()
        if ok:
            scores, doc_ids = self.search(embedding_matrix(emb.take(ok), self.dim))
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
