"""The retrieve step for multi-vector corpora against a token index built by `mmembed index`.

The index stage's rows in and out, with the MaxSim stage's multi-vector queries: candidates come from the
nearest token rows of each query token, and are ranked by exact MaxSim (mmembed/stores/index_multi.py).
"""

from __future__ import annotations

from mmembed.stages.index_search import IndexSearchStage
from mmembed.stages.search_maxsim import MaxSimSearchStage
from mmembed.stores.index_multi import CANDIDATE_TOKENS, MultiVectorAnnIndex


class MaxSimIndexSearchStage(IndexSearchStage, MaxSimSearchStage):
    """CPU actor: multi-vector query rows in, k result rows per query from the token index out."""

    def __init__(self, index_uri: str, *, dim: int, top_k: int, storage_options: dict | None = None,
                 nprobe: int | None = None, ef_search: int | None = None, candidate_tokens: int = CANDIDATE_TOKENS):
        # The MaxSim stage's query handling, over no corpus files: the token index answers instead.
        MaxSimSearchStage.__init__(self, [], dim=dim, top_k=top_k, storage_options=storage_options, device="cpu")
        self.index = MultiVectorAnnIndex.load(index_uri, storage_options, nprobe=nprobe, ef_search=ef_search)
        self.index.candidate_tokens = candidate_tokens
        if self.index.index.d != dim:
            raise ValueError(f"index {index_uri} holds {self.index.index.d}-d vectors, its manifest says {dim}")
