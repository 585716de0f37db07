"""The retrieve step for multi-vector corpora against a token index built by `mmembed index`.

The index stage's rows in and out, with the MaxSim stage's multi-vector queries: candidates come from the
nearest token rows of each query token, and are ranked by exact MaxSim (mmembed/stores/index_multi.py).
"""

from __future__ import annotations

from mmembed.stages.index_search import IndexSearchStage
from mmembed.stages.search_maxsim import MaxSimSearchStage
from mmembed.stores.index_multi import CANDIDATE_TOKENS


class MaxSimIndexSearchStage(IndexSearchStage, MaxSimSearchStage):
    """CPU actor: multi-vector query rows in, k result rows per query from the token index out."""

    def __init__(self, index_uri: str, *, candidate_tokens: int = CANDIDATE_TOKENS, **kwargs):
        super().__init__(index_uri, **kwargs)
        self.index.candidate_tokens = candidate_tokens
