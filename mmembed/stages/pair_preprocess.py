"""Stage 2 of the rerank job: (query, document) records into CrossEncoder features, on CPU actors.

The embedding job's PreprocessStage does the per-record work (fetch, size limits, decode, one
modality dict per record); this stage runs it once per side and then hands the pair to
`CrossEncoder.preprocess`, exactly as `CrossEncoder.predict` does for `[query, doc]`. ST owns
the rest: the pair-to-message conversion with query/document roles, chat templates, prompts
as system messages, and the left padding causal rerankers need. The model is loaded without
weights, so a 2B reranker costs nothing here.
"""

from __future__ import annotations

from mmembed.decode import DecodeError
from mmembed.records import RECORD_SCHEMA
from mmembed.stages.preprocess import PreprocessStage, RecordError
from mmembed.stages.read_pairs import FOUND, SIDES
from mmembed.storage import FetchError

# What a missing id was looked up in, for the error row's reason.
RESOLVED_FROM = {"query": "--queries", "doc": "--corpus"}


class PairPreprocessStage(PreprocessStage):
    """CPU actor: PAIR_SCHEMA rows in, feature rows keyed by the pair id (or error rows) out.

    `model` must be a ModelSpec with kind="reranker". The output is PreprocessStage's: `id`
    is the pair id (JSON [query_id, doc_id]).
    """

    def _build_input(self, row: dict):
        inputs, labels = [], []
        for side, key in SIDES.items():
            if row[FOUND[side]] is None:
                raise RecordError(f"{key} {row[key]!r} not found in {RESOLVED_FROM[side]}")
            record = {name: row[f"{side}_{name}"] for name in RECORD_SCHEMA.names}
            try:
                value, label = super()._build_input(record)
            except (RecordError, FetchError, DecodeError) as exc:
                raise RecordError(f"{side}: {exc}") from None
            inputs.append(value)
            labels.append(label)
        return inputs, "|".join(labels)

    def _check_supported(self, label: str) -> None:
        # CrossEncoder.preprocess validates each side itself and its error becomes the reason.
        pass

    def _prepare(self, pair):
        return pair, None

    def _call(self, pairs: list, processing_kwargs: dict | None) -> dict:
        # Lists, like the pairs CrossEncoder.rank builds; prompt handling is ST's own.
        return self.model.preprocess(pairs, prompt=self.prompt)
