"""The retrieve step against an approximate index built by `mmembed index`.

The same rows in and out as the exact `SearchStage` (k result rows per query, ordered by score
descending then doc_id, or the query's error row); only the top-k comes from the FAISS index,
loaded once per actor, instead of a scan over the corpus shards.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmembed.stages.search import SearchStage

# Stands in for the doc id of a slot the index could not fill, so SearchStage's (score, doc_id)
# ordering never compares None; such rows are dropped before they leave the stage.
_EMPTY = "\x00empty"


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
        from mmembed.stores.index import AnnIndex

        # The exact stage's query handling, over no corpus files: the index answers instead.
        super().__init__([], dim=dim, top_k=top_k, storage_options=storage_options, device="cpu")
        self.index = AnnIndex.load(index_uri, storage_options, nprobe=nprobe, ef_search=ef_search)
        if self.index.index.d != dim:
            raise ValueError(f"index {index_uri} holds {self.index.index.d}-d vectors, its manifest says {dim}")

    def search(self, queries: np.ndarray):
        scores, doc_ids = self.index.search(queries, self.top_k)
        doc_ids[np.equal(doc_ids, None)] = _EMPTY
        return scores, doc_ids

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = super().__call__(batch)
        # AnnIndex widens a search until k hits are found; a slot still empty (an index that cannot
        # reach some vectors) ranks last, so dropping it keeps ranks 1..n.
        return out.filter(pc.invert(pc.fill_null(pc.equal(out.column("doc_id"), _EMPTY), False)))
