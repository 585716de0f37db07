"""Stage 2 of the rerank job for multi-vector models: each side of a pair into its own features.

A MultiVectorEncoder scores a pair by MaxSim between the query's and the document's token vectors, so
each side is preprocessed as `encode_query` and `encode_document` would: the query with the "query"
prompt and task (prefix, expansion), the document with the document prompt and task (skiplist). Both
sides travel in one feature row, their keys prefixed `query:` and `doc:`; the score stage splits them.
Fetching, decoding, id lookups and error rows are the cross-encoder pair stage's.
"""

from __future__ import annotations

from mmembed.media.av import prepare_for_st
from mmembed.models.features import pack, split_batch
from mmembed.models.loading import resolve_prompt
from mmembed.stages.pair_preprocess import PairPreprocessStage
from mmembed.stages.preprocess import RecordError, _reason

SIDE_TASKS = {"query": "query", "doc": "document"}


def prefixed(sides: dict[str, dict]) -> dict:
    """{"query": features, "doc": features} as one features dict with `side:` keys."""
    return {f"{side}:{key}": value for side, features in sides.items() for key, value in features.items()}


class MultiVectorPairPreprocessStage(PairPreprocessStage):
    """CPU actor: pair rows in, one feature row per pair holding both sides' features (or an error row)."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.prompts = {side: resolve_prompt(self.model, task, None, None) for side, task in SIDE_TASKS.items()}

    def _build_input(self, row: dict):
        inputs, label = super()._build_input(row)
        if label == "message":
            raise RecordError("a multi-vector model scores a query against a document; a `messages` conversation "
                              "has no such sides. Give the pair as query and doc")
        return inputs, label

    def _prepare(self, st_input):
        sides = []
        for value in st_input:
            value, kwargs = prepare_for_st(value)
            if kwargs:
                raise RecordError("a multi-vector pair takes text and image sides, not audio or video")
            sides.append(value)
        return sides, None

    def _side(self, side: str, values: list) -> dict:
        return self.model.preprocess(values, prompt=self.prompts[side], task=SIDE_TASKS[side])

    def _call(self, st_inputs: list, processing_kwargs: dict | None) -> dict:
        return prefixed({side: self._side(side, [pair[i] for pair in st_inputs]) for i, side in enumerate(SIDE_TASKS)})

    def _preprocess_together(self, label: str, items: list, results: list) -> None:
        """Each side of the pairs in one processor call, split back into pairs (record by record where a
        side's processor output cannot be split, as the embedding stage does)."""
        per_side = {}
        for i, side in enumerate(SIDE_TASKS):
            try:
                per_side[side] = split_batch(self._side(side, [pair[i] for _, pair in items]), len(items))
            except Exception:  # noqa: BLE001 - retried pair by pair below, which names the bad one
                per_side[side] = None
        for k, (i, pair) in enumerate(items):
            try:
                sides = {side: rows[k] if rows is not None else self._side(side, [pair[j]])
                         for j, (side, rows) in enumerate(per_side.items())}
                results[i] = (pack(prefixed(sides), self.transport_dtype, self.uint8_pixels), None)
            except Exception as exc:  # noqa: BLE001
                results[i] = (None, _reason(exc))
