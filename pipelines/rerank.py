"""Ray job entry point: rerank candidate (query, document) pairs with a CrossEncoder.

    python -m pipelines.rerank --candidates URI --output URI --model NAME_OR_PATH [--corpus URI] [--top-k K]

`mmembed rerank` runs this same code. Everything that can be checked without a cluster is
checked before Ray starts; then read pairs -> preprocess (CPU pool) -> score (GPU pool) ->
rank per query -> write, streaming. Scores equal `CrossEncoder.predict` on the same pairs and
ranks equal `CrossEncoder.rank` (ties: doc_id ascending).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from mmembed import __version__
from mmembed.outputs import check_output, clear_owned
from mmembed.device_use import summarise as summarise_device_use
from mmembed.manifest import MANIFEST_NAME, command_line, library_versions, now_iso, read_json, report, write_json
from mmembed.models import ModelSpec, load_model, model_revision, modality_label, resolve_prompt, unsupported_modalities
from mmembed.options import (
    UsageError,
    add_io_options,
    add_on_unsupported_option,
    add_model_options,
    add_runtime_options,
    fetch_kwargs,
    job_main,
    positive_int,
)
from mmembed.records import InputError, check_unique_ids, discover
from mmembed.storage import filesystem, join_uri
from pipelines.embed import EXIT_ERRORS, EXIT_OK, encoder_pool, init_ray, plan_resources

log = logging.getLogger("mmembed")

RESULT_COLUMNS = ["query_id", "doc_id", "score", "rank"]


def build_parser(prog: str = "mmembed rerank") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Score and rank candidate (query, document) pairs with a sentence-transformers CrossEncoder "
        "(BERT-style cross-encoders, Qwen3-VL rerankers), on Ray. Scores equal CrossEncoder.predict and ranks "
        "equal CrossEncoder.rank on the same pairs.",
        epilog="Candidates: Parquet (file, directory or glob) with query_id, query, doc_id and doc. A query/doc "
        "cell is text, a media URI or path (a string ending in a media extension, without spaces unless "
        "absolute: images, audio, video), raw image bytes, an audio struct {array, sampling_rate}, or a struct "
        "{text, image, audio, video} for multimodal records (its audio may be such a struct, its image/video "
        "bytes). Chat messages: a `messages` column holds a pair as one conversation, as CrossEncoder.predict "
        "takes it: a list of {role, content} with roles `query` and `document` (and `system` for an "
        "instruction), content a string or a list of {type, text|image|audio|video} parts; such rows need no "
        "query/doc cells (CrossEncoder has no form for messages as one side of a pair, so a list-typed "
        "query/doc column, or a --corpus record with `messages`, is refused). A modality the reranker cannot "
        "take is refused before Ray starts (see --on-unsupported). Other "
        "columns (e.g. the retrieval score of `mmembed search`) are ignored. Output: part-*.parquet "
        "(query_id, doc_id, score, rank; rank 1 = best in its query), _errors/*.parquet (id = JSON "
        "[query_id, doc_id], stage, error) and _manifest.json. Exit codes: 0 ok, 2 bad usage (nothing ran), "
        "3 more errors than --max-error-fraction, 1 job failed.",
    )
    p.add_argument("--candidates", required=True, help="Candidates dataset: local path or fsspec URI.")
    p.add_argument("--output", required=True, help="Output directory: local path or fsspec URI (e.g. s3://b/p).")
    g = p.add_argument_group("resolving records by id")
    g.add_argument(
        "--corpus",
        default=None,
        help="A corpus in the embed job's input format (Parquet manifest with `id`, or a media directory); "
        "documents are looked up by doc_id and the candidates' `doc` column may be absent (it is ignored). "
        "A doc_id missing from the corpus becomes an error row.",
    )
    g.add_argument(
        "--queries",
        default=None,
        help="Likewise for queries, looked up by query_id (e.g. the query manifest given to `mmembed search`).",
    )
    add_model_options(p)
    g = p.add_argument_group("ranking (as in CrossEncoder.rank)")
    add_on_unsupported_option(g, "score", "pairs")
    g.add_argument("--top-k", type=positive_int, default=None, help="Keep the best K documents per query (default: all).")
    g.add_argument("--prompt-name", default=None, help="A key of the reranker's `prompts` (its instruction).")
    g.add_argument("--prompt", default=None, help="A literal prompt/instruction (wins over --prompt-name).")
    g.add_argument("--overwrite", action="store_true", help="Replace a finished output at --output.")
    g.add_argument(
        "--shuffle-partitions",
        type=positive_int,
        default=None,
        help="Hash partitions for grouping by query (and for id lookups); default: the cluster's CPU count.",
    )
    add_runtime_options(p)
    add_io_options(p)
    return p


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


def refuse_finished_output(args) -> None:
    existing = read_json(join_uri(args.output, MANIFEST_NAME), args.storage_options)
    if existing and not args.overwrite:
        raise UsageError(
            f"{args.output} already holds a finished run ({existing.get('job')}, {existing.get('finished_at')}). "
            "Choose another --output, or pass --overwrite to replace it."
        )


def load_reranker(args) -> tuple[ModelSpec, object]:
    spec = ModelSpec(
        args.model,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        model_kwargs=args.model_kwargs,
        processor_kwargs=args.processor_kwargs,
        kind="reranker",
    )
    try:
        model = load_model(spec, weights=False)
    except Exception as exc:  # noqa: BLE001 - a model that does not load is a usage problem
        raise UsageError(
            f"cannot load reranker {args.model!r} as a CrossEncoder: {type(exc).__name__}: {exc}. Check the "
            "name or path, --revision, --trust-remote-code, and HF_HUB_OFFLINE."
        ) from None
    if model.num_labels != 1:
        raise UsageError(
            f"reranker {args.model} has {model.num_labels} labels; ranking needs a model with one score per pair "
            "(as CrossEncoder.rank does)."
        )
    return spec, model


def refuse_unsupported(args, model, candidates, manifests: dict) -> None:
    """The modalities of the candidates (a sample) and of the --corpus/--queries manifests that the
    reranker cannot take: refused before Ray starts unless --on-unsupported error-row."""
    from mmembed.stages.pair_preprocess import SIDE_MESSAGES
    from mmembed.stages.read import sample_record_modalities
    from mmembed.stages.read_pairs import sample_pair_modalities

    supported = ", ".join(modality_label(m) for m in model.modalities)
    problems = []
    labels = sample_pair_modalities(candidates, tuple(manifests), args.storage_options)
    bad = unsupported_modalities(model, labels)
    if bad:
        problems.append(f"the candidates hold {', '.join(bad)} inputs")
    for side, spec in manifests.items():
        flag = "--corpus" if side == "doc" else "--queries"
        labels = (set(spec.modalities) | sample_record_modalities(spec, args.storage_options)) - {"message"}
        bad = unsupported_modalities(model, labels)
        if bad:
            problems.append(f"{flag} holds {', '.join(bad)} records")
        if "message" in spec.modalities:
            problems.append(f"{flag} holds `messages` records, and {SIDE_MESSAGES}")
    if problems and args.on_unsupported == "fail":
        raise UsageError(
            f"{'; '.join(problems)}; reranker {args.model} takes {supported}. Use a reranker that takes them "
            "(e.g. a Qwen3-VL reranker for images and video), filter those pairs out, or pass --on-unsupported "
            "error-row to write them as error rows and score the rest."
        )


def plan(args) -> dict:
    """Every check that needs no cluster. Raises UsageError."""
    from mmembed.stages.read_pairs import check_cell_types, discover_candidates, missing_columns

    check_output("rerank", args.output, args.storage_options, overwrite=args.overwrite,
                 inputs={"--candidates": args.candidates, "--queries": args.queries, "--corpus": args.corpus})
    try:
        candidates = discover_candidates(args.candidates, args.storage_options)
    except InputError as exc:
        raise UsageError(str(exc)) from None
    manifests = {}
    if args.queries:
        manifests["query"] = resolve_manifest(args.queries, "--queries", args.storage_options)
    if args.corpus:
        manifests["doc"] = resolve_manifest(args.corpus, "--corpus", args.storage_options)
    missing = missing_columns(candidates, tuple(manifests))
    if missing:
        hints = []
        if "doc" in missing:
            hints.append("pass --corpus URI to look documents up by doc_id")
        if "query" in missing:
            hints.append("pass --queries URI to look queries up by query_id")
        raise UsageError(
            f"candidates {args.candidates} lack required column(s) {', '.join(missing)}; found columns: "
            f"{', '.join(candidates.columns) or '(none)'}. A candidates dataset needs query_id, query, doc_id "
            "and doc, or a `messages` conversation per pair" + (f" ({'; '.join(hints)})" if hints else "") + "."
        )
    try:
        check_cell_types(candidates, tuple(manifests))
    except InputError as exc:
        raise UsageError(str(exc)) from None
    spec, model = load_reranker(args)
    refuse_unsupported(args, model, candidates, manifests)
    try:
        prompt = resolve_prompt(model, None, args.prompt_name, args.prompt)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    refuse_finished_output(args)
    return {
        "candidates": candidates,
        "manifests": manifests,
        "model_spec": spec,
        "revision": model_revision(spec),
        "prompt": prompt,
        "activation_fn": type(model.activation_fn).__name__ if model.activation_fn is not None else None,
        "modalities": [str(m) for m in model.modalities],
    }


def pool_remote_args(args, res: dict) -> tuple[dict, dict]:
    """Ray resources of the CPU (preprocess) and GPU (model) actor pools, from the shared options."""
    cpu = {"num_cpus": res["cpus_per_preprocessor"]}
    gpu = {"num_cpus": res["cpus_per_encoder"]}
    if args.memory_per_preprocessor:
        cpu["memory"] = args.memory_per_preprocessor
    if res["device"] == "cuda":
        gpu["num_gpus"] = res["gpus_per_encoder"]
    for remote, extra in ((cpu, args.preprocessor_resources), (gpu, args.encoder_resources)):
        if extra:
            remote["resources"] = extra
    return cpu, gpu


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------
def compose(args, p: dict, res: dict, partitions: int):
    """read pairs -> preprocess -> score -> rank, as a lazy Ray dataset."""
    from ray.data import ActorPoolStrategy

    from mmembed.stages.pair_preprocess import PairPreprocessStage
    from mmembed.stages.rank import RankStage
    from mmembed.stages.read_pairs import ReadPairsStage
    from mmembed.stages.score import ScoreStage

    cpu, gpu = pool_remote_args(args, res)
    ds = ReadPairsStage(
        p["candidates"], manifests=p["manifests"], storage_options=args.storage_options, num_partitions=partitions
    ).dataset()
    ds = ds.map_batches(
        PairPreprocessStage,
        fn_constructor_args=(p["model_spec"],),
        fn_constructor_kwargs={
            "prompt_name": args.prompt_name,
            "prompt": args.prompt,
            **fetch_kwargs(args),
        },
        batch_size=args.preprocess_batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=res["num_preprocessors"]),
        **cpu,
    )
    ds = ds.map_batches(
        ScoreStage,
        fn_constructor_args=(p["model_spec"],),
        fn_constructor_kwargs={
            "device": res["device"],
            "batch_size": args.batch_size,
            "max_batch_tokens": getattr(args, "max_batch_tokens", None),
            "max_batch_patches": getattr(args, "max_batch_patches", None),
            "copy_mode": getattr(args, "copy_mode", "staged"),
        },
        batch_size=getattr(args, "encode_window", None) or args.batch_size,
        batch_format="pyarrow",
        compute=encoder_pool(res),
        max_restarts=-1,
        max_task_retries=-1,
        **gpu,
    )
    return RankStage(args.top_k, num_partitions=partitions).apply(ds)


def derive_args(parser: argparse.ArgumentParser, argv: list, args) -> argparse.Namespace:
    """Another job's options: its own argv, plus every option of ours it shares (compute, storage...)."""
    ns = parser.parse_args([str(a) for a in argv])
    given = {a.dest for a in parser._actions if any(str(o) in argv for o in a.option_strings)}
    for dest, value in vars(args).items():
        if hasattr(ns, dest) and dest not in given:
            setattr(ns, dest, value)
    return ns


def prepare_output(args, job: str = "rerank") -> None:
    if args.overwrite:
        clear_owned(job, args.output, args.storage_options)


def write(ds, args, result_columns: list[str]) -> dict:
    from mmembed.stages.write_ray import RayShardWriter

    sink = RayShardWriter(
        args.output, result_columns=result_columns, storage_options=args.storage_options, shard_rows=args.shard_rows
    )
    ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.25})
    return sink.result or {"files": [], "error_files": [], "written": 0, "errors": 0, "modalities": {}}


def start_cluster(args) -> tuple[str, dict, int]:
    """Ray (embedded or --address), the actor plan and the shuffle partition count."""
    import ray
    from ray.data import DataContext

    where = init_ray(args.address)
    cluster = ray.cluster_resources()
    res = plan_resources(cluster.get("CPU", 1), cluster.get("GPU", 0), args)
    ctx = DataContext.get_current()
    ctx.enable_operator_progress_bars = ctx.enable_progress_bars
    partitions = getattr(args, "shuffle_partitions", None) or max(2, int(cluster.get("CPU", 2)))
    return where, res, partitions


def run_record(totals: dict, resources: dict, started: float, started_iso: str) -> dict:
    """The manifest entries every job records about its run: shards, resources, versions, timing."""
    return {
        "files": totals["files"],
        "error_files": totals["error_files"],
        "resources": resources,
        "device_use": summarise_device_use(totals.get("encoders", {})),
        "versions": library_versions(),
        "started_at": started_iso,
        "finished_at": now_iso(),
        "duration_s": round(time.time() - started, 3),
        "command_line": command_line(),
    }


def finish(job: str, args, manifest: dict, records: int, totals: dict) -> int:
    """Write _manifest.json, print the report and turn the counts into an exit code."""
    write_json(join_uri(args.output, MANIFEST_NAME), manifest, args.storage_options)
    print(report(f"mmembed {job}", manifest, args.output), flush=True)
    if totals["errors"] and not totals["written"]:
        print(f"mmembed {job}: every record failed ({totals['errors']:,} error rows, no results); see "
              f"{args.output.rstrip('/')}/_errors", file=sys.stderr)
        return EXIT_ERRORS
    lost = max(manifest["counts"].get("unaccounted") or 0, 0)
    failed_fraction = (totals["errors"] + lost) / max(records, 1)
    if failed_fraction > args.max_error_fraction:
        print(
            f"mmembed {job}: {failed_fraction:.1%} of records failed, above --max-error-fraction "
            f"{args.max_error_fraction:.1%}; see {args.output.rstrip('/')}/_errors",
            file=sys.stderr,
        )
        return EXIT_ERRORS
    return EXIT_OK


def run(args) -> int:
    started, started_iso = time.time(), now_iso()
    p = plan(args)
    where, res, partitions = start_cluster(args)
    prepare_output(args)
    totals = write(compose(args, p, res, partitions), args, RESULT_COLUMNS)
    records = p["candidates"].num_records
    rest = records - totals["written"] - totals["errors"]
    manifest = {
        "status": "complete",
        "job": "rerank",
        "mmembed_version": __version__,
        "model": {
            "name": args.model,
            "kind": "reranker",
            "revision": p["revision"],
            "activation_fn": p["activation_fn"],
            "prompt_name": args.prompt_name,
            "prompt": p["prompt"],
            "model_kwargs": args.model_kwargs,
            "processor_kwargs": args.processor_kwargs,
            "modalities": p["modalities"],
        },
        "input": {
            "candidates": args.candidates,
            "fingerprint": p["candidates"].fingerprint,
            "corpus": args.corpus,
            "queries": args.queries,
            "records": records,
        },
        "output": {"uri": args.output, "shard_rows": args.shard_rows, "top_k": args.top_k, "columns": RESULT_COLUMNS},
        "counts": {
            "records": records,
            "written": totals["written"],
            "errors": totals["errors"],
            # With --top-k the pairs ranked below K are neither written nor errors.
            "below_top_k": rest if args.top_k else 0,
            "unaccounted": None if args.top_k else rest,
        },
        **run_record(totals, {**res, "shuffle_partitions": partitions, "ray": where}, started, started_iso),
    }
    return finish("rerank", args, manifest, records, totals)


def main(argv: list[str] | None = None) -> int:
    return job_main("rerank", build_parser(), run, argv)


if __name__ == "__main__":
    from mmembed.options import exit_process

    exit_process(main())
