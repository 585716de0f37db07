"""The retrieve step for multi-vector corpora: exact MaxSim top-k, streamed over the shards.

The single-vector scan (mmembed/stages/search.py) with ragged vectors: each corpus block is a list of
documents' token vectors, scored against the queries' token vectors with the corpus model's own
similarity (ST's `maxsim` or `meanmaxsim`, as `MultiVectorEncoder.similarity` calls it), and merged into
a running top-k per query. Memory is one block of documents' vectors and one block of scores.
"""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow.parquet as pq

from mmembed.schema import flat_vectors
from mmembed.stages.search import SearchStage
from mmembed.storage.fs import filesystem

# Documents per block: a page holds hundreds to a thousand vectors, so far fewer documents than
# single-vector rows fit a block.
MAXSIM_BLOCK_DOCS = 1024


def ragged_vectors(column, dim: int) -> list[np.ndarray]:
    """A list<fixed_size_list<float>> column as one float32 [n_i, dim] array per row (null rows empty)."""
    flat, counts = flat_vectors(column, dim)
    return np.split(flat, np.cumsum(counts)[:-1]) if len(counts) else []


class MaxSimSearchStage(SearchStage):
    """GPU (or CPU) actor: multi-vector query rows in, k result rows per query (or its error row) out."""

    multi_vector = True

    def __init__(self, corpus_files: list[str], *, dim: int, top_k: int, similarity_fn_name: str = "maxsim",
                 storage_options: dict | None = None, block_rows: int = MAXSIM_BLOCK_DOCS, device: str = "auto"):
        super().__init__(corpus_files, dim=dim, top_k=top_k, similarity_fn_name=similarity_fn_name,
                         storage_options=storage_options, block_rows=block_rows, device=device)

    def corpus_blocks(self):
        for uri in self.corpus_files:
            fs, path = filesystem(uri, self.storage_options)
            with fs.open(path, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=self.block_rows, columns=["id", "embedding"]):
                    ids = np.asarray(batch.column(0).to_pylist(), dtype=object)
                    yield ids, ragged_vectors(batch.column(1), self.dim), None

    def query_vectors(self, column) -> list[np.ndarray]:
        return ragged_vectors(column, self.dim)

    def prepare_queries(self, queries: list[np.ndarray]):
        return [self.torch.from_numpy(q.copy()).to(self.device) for q in queries]

    def score(self, q, block: list[np.ndarray]):
        with warnings.catch_warnings():
            # Views of the shard's Arrow buffer, only read.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            docs = [self.torch.from_numpy(d).to(self.device) for d in block]
        return self.similarity(q, docs).float()
