"""The rerank job: candidate (query, document) pairs in, scored and ranked pairs out.

    stages/read_pairs.py -> stages/pair_preprocess.py (CPU pool) -> stages/score.py (device pool)
        -> stages/rank.py (group by query) -> stages/write.py

Scores equal `CrossEncoder.predict` on the same pairs and ranks equal `CrossEncoder.rank`
(ties: doc_id ascending).
"""

from __future__ import annotations

from mmembed.errors import UsageError
from mmembed.executors.cluster import InputSize
from mmembed.executors.pipeline import CPU, DATASET, DEVICE, Stage
from mmembed.inputs.discover import InputError, check_unique_ids, discover, repeated_keys
from mmembed.jobs.config import RerankConfig, fetch_kwargs
from mmembed.jobs.runner import Job, Outcome
from mmembed.models.loading import (
    MULTI_VECTOR,
    ModelSpec,
    load_model,
    modality_label,
    model_family,
    model_revision,
    resolve_prompt,
    unsupported_modalities,
)
from mmembed.outputs.ownership import check_output, refuse_finished

RESULT_COLUMNS = ["query_id", "doc_id", "score", "rank"]


# --------------------------------------------------------------------------------------------
# Before Ray starts
# --------------------------------------------------------------------------------------------
def resolve_manifest(uri: str, flag: str, storage_options: dict):
    try:
        spec = discover(uri, storage_options)
        check_unique_ids(spec, storage_options)
    except InputError as exc:
        raise UsageError(f"{flag}: {exc}") from None
    return spec


def refuse_repeated_pairs(candidates, storage_options: dict, show: int = 5) -> None:
    """A (query_id, doc_id) pair listed twice would be scored twice and ranked twice: refused, as embed
    refuses a repeated id."""
    from mmembed.stages.read_pairs import SIDES

    repeated = repeated_keys(candidates, list(SIDES.values()), storage_options)
    if repeated:
        first = ", ".join(f"({q!r}, {d!r})" for q, d in repeated[:show])
        raise InputError(
            f"candidates {candidates.uri} list {len(repeated)} (query_id, doc_id) pair(s) more than once; a pair "
            f"is scored and ranked once, so each must be listed once. First: {first}. Drop the repeats first "
            "(e.g. SELECT DISTINCT in DuckDB, or pandas drop_duplicates(['query_id', 'doc_id']))."
        )


def load_reranker(cfg: RerankConfig) -> tuple[ModelSpec, object]:
    """The reranker's spec and weightless model: a CrossEncoder, or a MultiVectorEncoder scoring pairs by MaxSim."""
    spec = cfg.model_spec("reranker")
    try:
        if model_family(spec) == MULTI_VECTOR:
            if cfg.prompt or cfg.prompt_name:
                raise UsageError(f"{cfg.model} is a multi-vector model: each side takes the prompt "
                                 "encode_query / encode_document would; drop --prompt and --prompt-name.")
            spec = cfg.model_spec("multivector")
            return spec, load_model(spec, weights=False)
        model = load_model(spec, weights=False)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - a model that does not load is a usage problem
        raise UsageError(
            f"cannot load reranker {cfg.model!r} as a CrossEncoder: {type(exc).__name__}: {exc}. Check the "
            "name or path, --revision, --trust-remote-code, and HF_HUB_OFFLINE."
        ) from None
    if model.num_labels != 1:
        raise UsageError(
            f"reranker {cfg.model} has {model.num_labels} labels; ranking needs a model with one score per pair "
            "(as CrossEncoder.rank does)."
        )
    return spec, model


def refuse_unsupported(cfg, model, candidates, manifests: dict) -> set[str]:
    """The modalities of the candidates (a sample) and of the --corpus/--queries manifests that the
    reranker cannot take: refused before Ray starts unless --on-unsupported error-row. Returns the
    modalities seen (they size the run)."""
    from mmembed.stages.pair_preprocess import SIDE_MESSAGES
    from mmembed.stages.read import sample_record_modalities
    from mmembed.stages.read_pairs import sample_pair_modalities

    supported = ", ".join(modality_label(m) for m in model.modalities)
    problems = []
    labels = sample_pair_modalities(candidates, tuple(manifests), cfg.storage_options)
    seen = set(labels)
    bad = unsupported_modalities(model, labels)
    if bad:
        problems.append(f"the candidates hold {', '.join(bad)} inputs")
    for side, spec in manifests.items():
        flag = "--corpus" if side == "doc" else "--queries"
        labels = (set(spec.modalities) | sample_record_modalities(spec, cfg.storage_options)) - {"message"}
        seen |= labels
        bad = unsupported_modalities(model, labels)
        if bad:
            problems.append(f"{flag} holds {', '.join(bad)} records")
        if "message" in spec.modalities:
            problems.append(f"{flag} holds `messages` records, and {SIDE_MESSAGES}")
    if problems and cfg.on_unsupported == "fail":
        raise UsageError(
            f"{'; '.join(problems)}; reranker {cfg.model} takes {supported}. Use a reranker that takes them "
            "(e.g. a Qwen3-VL reranker for images and video), filter those pairs out, or pass --on-unsupported "
            "error-row to write them as error rows and score the rest."
        )
    return seen


def plan(cfg: RerankConfig) -> dict:
    """Every check that needs no cluster. Raises UsageError."""
    from mmembed.stages.read_pairs import check_cell_types, discover_candidates, missing_columns

    check_output("rerank", cfg.output, cfg.storage_options, overwrite=cfg.overwrite,
                 inputs={"--candidates": cfg.candidates, "--queries": cfg.queries, "--corpus": cfg.corpus})
    try:
        candidates = discover_candidates(cfg.candidates, cfg.storage_options)
    except InputError as exc:
        raise UsageError(str(exc)) from None
    manifests = {}
    if cfg.queries:
        manifests["query"] = resolve_manifest(cfg.queries, "--queries", cfg.storage_options)
    if cfg.corpus:
        manifests["doc"] = resolve_manifest(cfg.corpus, "--corpus", cfg.storage_options)
    missing = missing_columns(candidates, tuple(manifests))
    if missing:
        hints = []
        if "doc" in missing:
            hints.append("pass --corpus URI to look documents up by doc_id")
        if "query" in missing:
            hints.append("pass --queries URI to look queries up by query_id")
        raise UsageError(
            f"candidates {cfg.candidates} lack required column(s) {', '.join(missing)}; found columns: "
            f"{', '.join(candidates.columns) or '(none)'}. A candidates dataset needs query_id, query, doc_id "
            "and doc, or a `messages` conversation per pair" + (f" ({'; '.join(hints)})" if hints else "") + "."
        )
    try:
        check_cell_types(candidates, tuple(manifests))
        refuse_repeated_pairs(candidates, cfg.storage_options)
    except InputError as exc:
        raise UsageError(str(exc)) from None
    spec, model = load_reranker(cfg)
    multi = spec.kind == "multivector"
    seen = refuse_unsupported(cfg, model, candidates, manifests)
    try:
        prompt = (None if multi else resolve_prompt(model, None, cfg.prompt_name, cfg.prompt))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    refuse_finished(cfg.output, cfg.storage_options, cfg.overwrite)
    return {
        "candidates": candidates,
        "manifests": manifests,
        "model_spec": spec,
        "revision": model_revision(spec),
        "prompt": prompt,
        "activation_fn": (type(model.activation_fn).__name__ if getattr(model, "activation_fn", None) is not None
                          else None),
        "similarity_fn_name": model.similarity_fn_name if multi else None,
        "multi_vector": multi,
        "modalities": [str(m) for m in model.modalities],
        # What --executor auto sizes by: the pairs, and whether any side holds media.
        "sizing": InputSize(candidates.num_records, tuple(sorted(seen))),
    }


# --------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------
def shuffle_partitions(cfg: RerankConfig, cpus: float) -> int:
    """Hash partitions for grouping by query and for id lookups."""
    return cfg.shuffle_partitions or max(2, int(cpus))


def source(cfg: RerankConfig, p: dict, partitions: int, local: bool = False):
    """The pairs: a Ray dataset, or Arrow blocks read in this process."""
    from mmembed.stages.read_pairs import ReadPairsStage

    read = ReadPairsStage(p["candidates"], manifests=p["manifests"], storage_options=cfg.storage_options,
                          num_partitions=partitions)
    return read.tables(block_rows=max(cfg.preprocess_batch_size, 256)) if local else read.dataset()


def stages(cfg: RerankConfig, p: dict, res: dict, partitions: int) -> list:
    """preprocess pairs -> score -> rank per query."""
    from mmembed.executors.cluster import cpu_pool, device_pool
    from mmembed.stages.pair_preprocess import PairPreprocessStage
    from mmembed.stages.pair_preprocess_multi import MultiVectorPairPreprocessStage
    from mmembed.stages.rank import RankStage
    from mmembed.stages.score import ScoreStage
    from mmembed.stages.score_multi import MultiVectorScoreStage

    multi = p.get("multi_vector")
    return [
        Stage(MultiVectorPairPreprocessStage if multi else PairPreprocessStage, args=(p["model_spec"],),
              kwargs={"prompt_name": cfg.prompt_name, "prompt": cfg.prompt, **fetch_kwargs(cfg)},
              pool=CPU, batch_size=cfg.preprocess_batch_size, actors=res["num_preprocessors"],
              resources=cpu_pool(cfg, res)),
        Stage(MultiVectorScoreStage if multi else ScoreStage, args=(p["model_spec"],),
              kwargs={"device": res["device"], "batch_size": cfg.batch_size, "max_batch_tokens": cfg.max_batch_tokens,
                      "max_batch_patches": cfg.max_batch_patches, "copy_mode": cfg.copy_mode},
              pool=DEVICE, batch_size=cfg.encode_window or cfg.batch_size, actors=res["num_encoders"],
              calls=res.get("calls_per_encoder", 1), resources=device_pool(cfg, res)),
        Stage(RankStage(cfg.top_k, num_partitions=partitions).apply, pool=DATASET,
              local=RankStage(cfg.top_k).apply_local),
    ]


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------
class RerankJob(Job):
    name = "rerank"

    def plan(self) -> dict:
        return plan(self.cfg)

    def executor(self, p: dict) -> str:
        from mmembed.executors.cluster import choose_executor

        return choose_executor(self.cfg, p["sizing"], standin=bool(self.replacements))

    def execute(self, p: dict, ex) -> Outcome:
        from mmembed.outputs.ownership import clear_owned

        cfg = self.cfg
        if cfg.overwrite:
            clear_owned("rerank", cfg.output, cfg.storage_options)
        partitions = shuffle_partitions(cfg, ex.cpus)
        sink = ex.sink(cfg.output, RESULT_COLUMNS, cfg)
        totals = ex.write(source(cfg, p, partitions, ex.local), self.with_stand_ins(stages(cfg, p, ex.res, partitions)),
                          sink)
        records = p["candidates"].num_records
        rest = records - totals["written"] - totals["errors"]
        manifest = {
            "model": {
                "name": cfg.model,
                "kind": "multivector" if p.get("multi_vector") else "reranker",
                "revision": p["revision"],
                "activation_fn": p["activation_fn"],
                **({"similarity_fn_name": p["similarity_fn_name"]} if p.get("multi_vector") else {}),
                "prompt_name": cfg.prompt_name,
                "prompt": p["prompt"],
                "model_kwargs": cfg.model_kwargs,
                "processor_kwargs": cfg.processor_kwargs,
                "modalities": p["modalities"],
            },
            "input": {
                "candidates": cfg.candidates,
                "fingerprint": p["candidates"].fingerprint,
                "corpus": cfg.corpus,
                "queries": cfg.queries,
                "records": records,
            },
            "output": {"uri": cfg.output, "shard_rows": cfg.shard_rows, "top_k": cfg.top_k, "columns": RESULT_COLUMNS},
            "counts": {
                "records": records,
                "written": totals["written"],
                "errors": totals["errors"],
                # With --top-k the pairs ranked below K are neither written nor errors.
                "below_top_k": rest if cfg.top_k else 0,
                "unaccounted": None if cfg.top_k else rest,
            },
            "resources": ex.resources(shuffle_partitions=partitions),
        }
        return Outcome(manifest, totals)
