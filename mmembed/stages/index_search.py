"""The retrieve step against an approximate index built by `mmembed index`.

The same rows in and out as the exact `SearchStage` (k result rows per query, ordered by score
descending then doc_id, or the query's error row); only the top-k comes from the FAISS index,
loaded once per actor, instead of a scan over the corpus shards.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from mmembed.stages.search import SearchStage


class IndexSearchStage(SearchStage):
    """CPU actor: query embedding rows in, k result rows per query from the index out."""

    def __init__(
        self,
        index_uri: str,
        *,
        dim: int,
        top_k: int,
        storage_options: dict | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ):
        from mmembed.index import AnnIndex

        self.dim = dim
        self.top_k = top_k
        self.index = AnnIndex(index_uri, storage_options, nprobe=nprobe, ef_search=ef_search)

    def search(self, queries):
        return self.index.search(queries, self.top_k)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = super().__call__(batch)
        # An IVF search that probes lists holding fewer than k vectors returns empty slots; they
        # rank last, so dropping them keeps ranks 1..n.
        empty = pc.and_(pc.is_null(out.column("doc_id")), pc.is_null(out.column("error")))
        return out.filter(pc.invert(empty))
