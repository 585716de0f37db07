"""Stage 4 of the rerank job: rank every candidate of a query together.

Scores arrive in whatever blocks and batches the scoring pool produced, so one query's
candidates can be spread over many blocks and actors. A Ray Data groupby on `query_id`
(a hash shuffle, streaming, nothing on the driver) brings each query's rows into one group,
which is ranked as `CrossEncoder.rank` ranks: score descending, 1 = best. Ties, which
`rank` leaves in input order, are broken by `doc_id` ascending, so reruns agree whatever
the block order. Error rows keep flowing through with no rank.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from mmembed.schema import groups_by

RANKED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("query_id", pa.string()),
        ("doc_id", pa.string()),
        ("score", pa.float32()),
        ("rank", pa.int32()),
        ("stage", pa.string()),
        ("error", pa.string()),
    ]
)


def rank_group(group: pa.Table, top_k: int | None = None) -> pa.Table:
    """Rank one query's rows; keep the best `top_k` scored rows and every error row."""
    is_error = group.column("error").is_valid()
    scored = group.filter(pc.invert(is_error))
    order = pc.sort_indices(scored, sort_keys=[("score", "descending"), ("doc_id", "ascending")])
    scored = scored.take(order)
    if top_k is not None:
        scored = scored.slice(0, top_k)
    ranks = pa.array(range(1, scored.num_rows + 1), pa.int32())
    scored = scored.append_column("rank", ranks)
    errors = group.filter(is_error)
    errors = errors.append_column("rank", pa.nulls(errors.num_rows, pa.int32()))
    return pa.concat_tables([scored.select(RANKED_SCHEMA.names), errors.select(RANKED_SCHEMA.names)]).cast(
        RANKED_SCHEMA
    )


class RankStage:
    """Applies `rank_group` per query to a dataset of SCORE_SCHEMA rows (`apply`), or to the blocks of
    the in-process executor (`apply_local`)."""

    def __init__(self, top_k: int | None = None, *, num_partitions: int = 2, num_cpus: float = 0.25):
        self.top_k = top_k
        self.num_partitions = num_partitions
        self.num_cpus = num_cpus

    def apply(self, ds):
        return ds.groupby("query_id", num_partitions=self.num_partitions).map_groups(
            rank_group, fn_kwargs={"top_k": self.top_k}, batch_format="pyarrow", num_cpus=self.num_cpus
        )

    def apply_local(self, blocks):
        """The same grouping in this process, over every block (an input small enough to run here)."""
        tables = [b for b in blocks if b.num_rows]
        if not tables:
            return
        for group in groups_by(pa.concat_tables(tables, promote_options="default"), "query_id"):
            yield rank_group(group, self.top_k)
