"""Stage 2 of the rerank job: (query, document) records into CrossEncoder features, on CPU actors.

The embedding job's PreprocessStage does the per-record work (fetch, size limits, decode, one
modality dict per record, chat messages); this stage runs it once per side and then hands the
pair to `CrossEncoder.preprocess`, exactly as `CrossEncoder.predict` does for `[query, doc]`, or
hands it a candidate's `messages` conversation as `CrossEncoder.predict([messages])` would. ST
owns the rest: the pair-to-message conversion with query/document roles, chat templates, prompts
as system messages, and the left padding causal rerankers need. The model is loaded without
weights, so a 2B reranker costs nothing here.
"""

from __future__ import annotations

from mmembed.inputs.discover import MESSAGE_COLUMN
from mmembed.media.av import prepare_for_st, prepare_pair_for_st
from mmembed.media.decode import DecodeError
from mmembed.stages.preprocess import PreprocessStage, RecordError
from mmembed.stages.read_pairs import FOUND, SIDE_FIELDS, SIDES
from mmembed.storage.fetch import FetchError

# What a missing id was looked up in, for the error row's reason.
RESOLVED_FROM = {"query": "--queries", "doc": "--corpus"}

SIDE_MESSAGES = (
    "a `messages` record cannot be one side of a pair: CrossEncoder takes chat messages only as the whole "
    "pair, so give such pairs as a conversation (roles `query` and `document`) in the candidates' `messages` column"
)


class PairPreprocessStage(PreprocessStage):
    """CPU actor: pair rows (read_pairs' schema) in, feature rows keyed by the pair id (or error rows) out.

    `model` must be a ModelSpec with kind="reranker". The output is PreprocessStage's: `id`
    is the pair id (JSON [query_id, doc_id]).
    """

    def _build_input(self, row: dict):
        records = {side: {f.name: row[f"{side}_{f.name}"] for f in SIDE_FIELDS} for side in SIDES}
        if row.get(MESSAGE_COLUMN) is not None:
            if any(_has_content(r) for r in records.values()):
                raise RecordError("a candidate with `messages` (the whole pair as a conversation) cannot also have "
                                  "a query or doc record")
            messages = self._messages(row[MESSAGE_COLUMN])
            super()._check_supported("message")
            return messages, "message"
        inputs, labels = [], []
        for side, key in SIDES.items():
            if row[FOUND[side]] is None:
                raise RecordError(f"{key} {row[key]!r} not found in {RESOLVED_FROM[side]}")
            try:
                if records[side]["has_messages"]:
                    raise RecordError(SIDE_MESSAGES)
                value, label = super()._build_input(records[side])
                super()._check_supported(label)
            except (RecordError, FetchError, DecodeError) as exc:
                raise RecordError(f"{side}: {exc}") from None
            inputs.append(value)
            labels.append(label)
        return inputs, "|".join(labels)

    def _check_supported(self, label: str) -> None:
        # Checked per side (and for conversations) in _build_input, where the side is known.
        pass

    def _prepare(self, st_input):
        # A conversation is a list of messages; a pair's sides are never messages (refused above).
        if all(isinstance(m, dict) and "role" in m for m in st_input):
            return prepare_for_st(st_input)
        return prepare_pair_for_st(st_input)

    def _call(self, inputs: list, processing_kwargs: dict | None) -> dict:
        # Lists, like the pairs CrossEncoder.rank builds; prompt handling is ST's own.
        kwargs = {"processing_kwargs": processing_kwargs} if processing_kwargs else {}
        return self.model.preprocess(inputs, prompt=self.prompt, **kwargs)


def _has_content(record: dict) -> bool:
    return bool(record["has_messages"]) or any(v is not None for k, v in record.items() if k not in ("id", "has_messages"))
