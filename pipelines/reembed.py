"""Ray job entry point: keep a versioned embedding store current.

    python -m pipelines.reembed --input URI --store ROOT --model NAME_OR_PATH [--revision R] [--activate]

`mmembed reembed` runs this same code. The model and embedding settings name a version of the
store (see mmembed/store.py). When that version already has a committed snapshot, the run is
incremental: only records that are new or whose content hash changed are embedded, unchanged
ones are carried over from the version's latest snapshot, and ids that left the input are
dropped. Otherwise every record is embedded into a new version. Either way the run writes a new
snapshot, commits it with its manifest, and only then moves CURRENT: automatically when the
version is the current one (or the store has none yet), else only with --activate or a later
`mmembed activate`.

Two streaming passes, both on Ray Data; neither holds every id anywhere (see mmembed/changes.py):
  1. changes: read -> content hash (CPU pool) -> records and base rows split into id-hash buckets
     (scratch `_diff/`) -> one diff task per bucket -> `_changes/` (id, content_hash, status),
     `_diff/todo/` (records to embed) and `_diff/carry/` (base rows of unchanged records)
  2. embed:   `_diff/todo/` -> preprocess -> encode (the embed pipeline's stages, passing the
     content_hash column through) unioned with `_diff/carry/` -> shards; `_diff/` is removed
     before the snapshot commits
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import pyarrow as pa

from mmembed import __version__
from mmembed.device_use import summarise as summarise_device_use
from mmembed.changes import CHANGED, NEW, UNCHANGED
from mmembed.manifest import MANIFEST_NAME, command_line, library_versions, now_iso, report, write_json
from mmembed.options import (
    UsageError,
    add_embedding_options,
    add_io_options,
    add_model_options,
    add_runtime_options,
    job_main,
)
from mmembed.records import InputSpec
from mmembed.runstate import RunLock
from mmembed.store import Snapshot, Store, embedding_settings, model_slug, new_snapshot_id, version_id
from pipelines import embed

log = logging.getLogger("mmembed")

EXIT_OK, EXIT_ERRORS, EXIT_FAILED = embed.EXIT_OK, embed.EXIT_ERRORS, embed.EXIT_FAILED
CHANGES_DIR = "_changes"
SCRATCH_DIR = "_diff"  # the diff's buckets; removed before the snapshot commits


def build_parser(prog: str = "mmembed reembed") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Re-embed a corpus into a versioned embedding store. With the model and settings of an "
        "existing version, only new and changed records are embedded (judged by a content hash of their "
        "text and media bytes), unchanged ones carry over and ids that left the input are dropped. A new "
        "model or new settings embed everything into a new version; the current one keeps being served "
        "until --activate or `mmembed activate` switches CURRENT.",
        epilog="Store layout: ROOT/<model-slug>/<version>/<snapshot>/ holds part-*.parquet (id, embedding, "
        "modality, content_hash), _errors/, _changes/ (id, content_hash, status) and _manifest.json; "
        "ROOT/CURRENT names the snapshot readers should use. The report counts records as new (id not in the base "
        "snapshot), changed (content hash differs, or the base has an error row for it), unchanged (carried over) "
        "and deleted (in the base, not in the input). A run that fails or is killed leaves CURRENT and "
        "every committed snapshot as they were. Exit codes: 0 ok, 2 bad usage (nothing modified), 3 more "
        "errors than --max-error-fraction (snapshot kept, CURRENT not moved), 1 job failed.",
    )
    p.add_argument("--input", required=True, help="Manifest or media directory/glob: local path or fsspec URI.")
    p.add_argument(
        "--store",
        required=True,
        help="Embedding store root: local path or fsspec URI. A missing or empty directory becomes a new store.",
    )
    add_model_options(p)
    add_embedding_options(p)
    g = p.add_argument_group("versions")
    g.add_argument(
        "--activate",
        action="store_true",
        help="Point CURRENT at this run's snapshot once it commits, even when its version is not the current "
        "one (a new model or new settings). Runs of the current version, and the first run in a store, "
        "move CURRENT without it.",
    )
    g.add_argument(
        "--full",
        action="store_true",
        help="Embed every record again, carrying nothing over from the version's latest snapshot.",
    )
    g = p.add_argument_group("concurrent runs")
    g.add_argument(
        "--wait",
        action="store_true",
        help="When another reembed holds the store's lease (ROOT/_lock.json), wait for it to finish instead "
        "of exiting with code 2; the run then starts from whatever that one committed.",
    )
    g.add_argument(
        "--wait-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="With --wait, give up (exit 2, nothing modified) after this long, so a scheduled run cannot hang "
        "behind a stuck one (default: wait as long as the holder keeps its lease alive). A holder that "
        "crashed is taken over without waiting on this host, and after --lease-seconds elsewhere.",
    )
    g.add_argument(
        "--lease-seconds",
        type=float,
        default=60.0,
        help="This run's lease on the store is renewed every quarter of this; a crashed run's lease on another "
        "host is taken over once it is this old (default: 60).",
    )
    add_runtime_options(p)
    add_io_options(p)
    return p


def _parquet_reader_fs(uri: str, storage_options: dict):
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from mmembed.storage import filesystem

    fs, _ = filesystem(uri, storage_options)
    return fs, PyFileSystem(FSSpecHandler(fs))


def _shard_paths(store: Store, snap: Snapshot, key: str = "files") -> list[str]:
    return [store.uri(snap.slug, snap.version, snap.snapshot, f["name"]) for f in snap.manifest.get(key, [])]


def _read_parquet(paths: list[str], storage_options: dict, **kwargs):
    import ray.data

    fs, pafs = _parquet_reader_fs(paths[0], storage_options)
    return ray.data.read_parquet([fs._strip_protocol(u) for u in paths], filesystem=pafs, num_cpus=0.25, **kwargs)


def _write_buckets(ds, uri: str, buckets: int, storage_options: dict) -> None:
    """Write a dataset split by id bucket (`uri/bucket=K/*.parquet`), streaming."""
    from mmembed.changes import BUCKET, add_bucket

    ds = ds.map_batches(add_bucket, fn_kwargs={"buckets": buckets}, batch_format="pyarrow", batch_size=None,
                        num_cpus=0.25)
    fs, pafs = _parquet_reader_fs(uri, storage_options)
    ds.write_parquet(fs._strip_protocol(uri), filesystem=pafs, partition_cols=[BUCKET], ray_remote_args={"num_cpus": 0.25})


def diff_buckets(records, base_paths: list[str], base_errors: list[str], buckets: int, out: str, schema: pa.Schema,
                 storage_options: dict) -> tuple[dict, str]:
    """Diff records carrying (id, content_hash) against a base snapshot's shards, bucket by bucket.

    Writes `out/_changes/` and, under the scratch directory it returns with the counts, `todo/`
    (the records to embed, with their hash) and `carry/` (the base rows to keep, in `schema`).
    """
    import ray

    from mmembed.changes import NEW, diff_bucket
    from mmembed.storage import join_uri

    scratch = join_uri(out, SCRATCH_DIR)
    _write_buckets(records, join_uri(scratch, "new"), buckets, storage_options)
    if base_paths:
        base = _read_parquet(base_paths, storage_options, columns=["id", "content_hash", "modality", "embedding"])
        _write_buckets(base, join_uri(scratch, "base"), buckets, storage_options)
    if base_errors:
        _write_buckets(_read_parquet(base_errors, storage_options, columns=["id"]), join_uri(scratch, "base_errors"),
                       buckets, storage_options)
    # Half a CPU each: at most two buckets per core in memory at once.
    task = ray.remote(diff_bucket).options(num_cpus=0.5)
    refs = [task.remote(k, scratch, join_uri(out, CHANGES_DIR), schema, storage_options) for k in range(buckets)]
    counts = {NEW: 0, CHANGED: 0, UNCHANGED: 0}
    for c in ray.get(refs):
        for key, n in c.items():
            counts[key] += n
    return counts, scratch


def changes_pass(args, p: dict, res: dict, base_paths: list[str] | None, base_errors: list[str], base_rows: int,
                 out: str, schema: pa.Schema) -> tuple[dict, str]:
    """Pass 1: hash every record and diff it against the base (see mmembed/changes.py)."""
    from ray.data import ActorPoolStrategy

    from mmembed.changes import num_buckets
    from mmembed.stages.content_hash import ContentHashStage
    from mmembed.stages.read import ReadStage

    so = args.storage_options
    hash_remote = {"num_cpus": res["cpus_per_preprocessor"]}
    if args.preprocessor_resources:
        hash_remote["resources"] = args.preprocessor_resources
    ds = ReadStage(p["input"], so).dataset()
    ds = ds.map_batches(
        ContentHashStage,
        fn_constructor_kwargs={"storage_options": so, "max_bytes": args.max_bytes, "allow_http": args.allow_http,
                               "http_timeout_s": args.http_timeout, "keep_record": True},
        batch_size=args.preprocess_batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=res["num_preprocessors"]),
        **hash_remote,
    )
    buckets = num_buckets(max(p["input"].num_records, base_rows))
    return diff_buckets(ds, base_paths or [], base_errors, buckets, out, schema, so)


def _conform(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    return batch.select(schema.names).cast(schema)


def embed_pass(args, p: dict, res: dict, counts: dict, scratch: str, schema: pa.Schema, out: str) -> dict:
    """Pass 2: embed the records the diff left to embed, union the base rows it kept, write one snapshot."""
    from mmembed.stages.write_ray import RayShardWriter
    from mmembed.storage import filesystem, join_uri, unstrip

    fs, root = filesystem(scratch, args.storage_options)
    fs.invalidate_cache(root)

    def files(sub: str) -> list[str]:
        return sorted(unstrip(fs, f) for f in fs.glob(f"{root.rstrip('/')}/{sub}/part-*.parquet"))

    parts = []
    if counts[NEW] + counts[CHANGED]:
        records = _read_parquet(files("todo"), args.storage_options)
        # The preprocess and encode stages carry each record's content hash through to its result row.
        ds = embed.compose(args, {**p, "records": records, "passthrough": ["content_hash"]}, res)
        # One schema for both branches: the shard writer concatenates their rows.
        ds = ds.map_batches(_conform, fn_kwargs={"schema": schema}, batch_format="pyarrow", batch_size=None,
                            num_cpus=0.25)
        parts.append(ds)
    if counts[UNCHANGED]:
        parts.append(_read_parquet(files("carry"), args.storage_options, columns=schema.names))
    sink = RayShardWriter(
        out,
        result_columns=["id", "embedding", "modality", "content_hash"],
        storage_options=args.storage_options,
        shard_rows=args.shard_rows,
    )
    if parts:
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.25})
    else:
        sink.on_write_start()
    try:
        fs.rm(root, recursive=True)
    except FileNotFoundError:
        pass
    return sink.result or {"files": [], "error_files": [], "written": 0, "errors": 0, "modalities": {}}


def check_ray_address(address: str | None) -> None:
    """Refuse a cluster address nothing listens on; `ray.init` would wait on it for minutes."""
    import socket

    if not address or address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise UsageError(
            f"cannot reach the Ray cluster at {address} ({exc}). Check --address / $RAY_ADDRESS; "
            "nothing was run or modified."
        ) from None


def _embed_defaults(args, output: str) -> None:
    """Give `args` every embed option reembed does not expose, at embed's default.

    embed.plan and embed.compose read the embed job's options; `--output` is the store root for
    plan's conflict check (a store root never holds a run manifest) and is replaced per snapshot.
    Options such as --split-modalities stay off: a store keys its content hashes by record id.
    """
    defaults = embed.build_parser().parse_args(["--input", args.input, "--output", output, "--model", args.model])
    for name, value in vars(defaults).items():
        if not hasattr(args, name):
            setattr(args, name, value)


def run(args) -> int:
    if args.wait_timeout is not None and not args.wait:
        raise UsageError("--wait-timeout needs --wait")
    started = time.time()
    started_iso = now_iso()
    # Every check before anything is written: the store root, then the embed pipeline's own plan.
    from mmembed.stages.encode import QUANTIZED

    if args.precision in QUANTIZED:
        # Carried-over vectors would need the base snapshot's calibration ranges; not supported yet.
        raise UsageError(f"reembed stores float32 or float16 vectors; --precision {args.precision} is for `mmembed embed`.")
    from mmembed.outputs import check_apart

    check_apart(args.store, "--input", args.input, output_flag="--store")
    store = Store(args.store, args.storage_options, create=True)
    check_ray_address(args.address)
    _embed_defaults(args, store.root)
    p = embed.plan(args)
    # One lease for the whole store root, not per version: CURRENT is store-wide, and two runs of
    # one version would each build on the same base snapshot, so the later commit would silently
    # drop the other's changes. It is taken before the base is chosen, so a run that waited
    # builds on what the holder committed.
    lock = RunLock(store.root, args.storage_options, ttl_s=args.lease_seconds,
                   run=f"mmembed reembed of {args.input} with {args.model}")
    lock.acquire(
        wait=args.wait, timeout_s=args.wait_timeout,
        on_wait=lambda who: print(f"mmembed reembed: waiting for the store's lease: {who}", flush=True),
    )
    try:
        return execute(args, Store(args.store, args.storage_options, create=True), p, started, started_iso)
    finally:
        lock.release()


def execute(args, store: Store, p: dict, started: float, started_iso: str) -> int:
    """The job proper, run while this process holds the store's lease."""
    settings = embedding_settings(args, p)
    slug, version = model_slug(args.model), version_id(settings)
    current = store.current_snapshot()
    base = None if args.full else store.latest(slug, version)
    base_paths = _shard_paths(store, base) if base else None
    snapshot = new_snapshot_id()
    out = store.uri(slug, version, snapshot)

    import ray
    from ray.data import DataContext

    where = embed.init_ray(args.address)
    cluster = ray.cluster_resources()
    res = embed.plan_resources(cluster.get("CPU", 1), cluster.get("GPU", 0), args)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.enable_operator_progress_bars = True

    store.ensure_marker()
    store.write_version_info(slug, version, settings)
    base_errors = _shard_paths(store, base, "error_files") if base else []
    from mmembed.stages.encode import embedding_schema

    schema = embedding_schema(p["dim"], args.precision).append(pa.field("content_hash", pa.string()))
    base_rows = base.manifest["counts"]["written"] + base.manifest["counts"]["errors"] if base else 0
    counts, scratch = changes_pass(args, p, res, base_paths, base_errors, base_rows, out, schema)
    changes = {
        NEW: counts[NEW],
        CHANGED: counts[CHANGED],
        UNCHANGED: counts[UNCHANGED],
        "deleted": base_rows - counts[CHANGED] - counts[UNCHANGED],
    }
    totals = embed_pass(args, p, res, counts, scratch, schema, out)
    changes["embedded"] = totals["written"] - counts[UNCHANGED]

    spec: InputSpec = p["input"]
    records = spec.num_records
    unaccounted = records - totals["written"] - totals["errors"]
    manifest = {
        "status": "complete",
        "job": "reembed",
        "mmembed_version": __version__,
        "store": {
            "root": store.root,
            "model_slug": slug,
            "version": version,
            "snapshot": snapshot,
            "mode": "incremental" if base else "full",
            "base_snapshot": base.snapshot if base else None,
        },
        "model": {"name": args.model, **settings, "similarity_fn_name": p["similarity_fn_name"]},
        "input": {"uri": args.input, "kind": spec.kind, "fingerprint": spec.fingerprint, "records": records},
        "output": {"uri": out, "shard_rows": args.shard_rows},
        "changes": changes,
        "counts": {
            "records": records,
            "written": totals["written"],
            "errors": totals["errors"],
            "unaccounted": unaccounted,
            "by_modality": totals["modalities"],
        },
        "files": totals["files"],
        "error_files": totals["error_files"],
        "resources": {**res, "ray": where},
        "device_use": summarise_device_use(totals.get("encoders", {})),
        "versions": library_versions(),
        "started_at": started_iso,
        "finished_at": now_iso(),
        "duration_s": round(time.time() - started, 3),
        "command_line": command_line(),
    }
    # The commit: once this manifest exists the snapshot is complete; CURRENT moves after it.
    write_json(store.uri(slug, version, snapshot, MANIFEST_NAME), manifest, args.storage_options)
    snap = Snapshot(slug, version, snapshot, manifest)
    print(report("mmembed reembed", manifest, out), flush=True)
    print(
        f"  changes  {changes[NEW]:,} new, {changes[CHANGED]:,} changed, {changes[UNCHANGED]:,} unchanged, "
        f"{changes['deleted']:,} deleted; {changes['embedded']:,} embedded "
        f"({manifest['store']['mode']}"
        + (f", base snapshot {base.snapshot})" if base else ")"),
        flush=True,
    )
    failed_fraction = (totals["errors"] + max(unaccounted, 0)) / max(records, 1)
    if totals["errors"] and not totals["written"]:
        print(f"mmembed reembed: every record failed ({totals['errors']:,} error rows, no embeddings); snapshot "
              f"{snap.path} is kept but CURRENT was not moved. See {out.rstrip('/')}/_errors", file=sys.stderr)
        return EXIT_ERRORS
    if failed_fraction > args.max_error_fraction:
        print(
            f"mmembed reembed: {failed_fraction:.1%} of records failed, above --max-error-fraction "
            f"{args.max_error_fraction:.1%}; snapshot {snap.path} is kept but CURRENT was not moved. "
            f"See {out.rstrip('/')}/_errors",
            file=sys.stderr,
        )
        return EXIT_ERRORS
    is_current = current is not None and (current.slug, current.version) == (slug, version)
    if args.activate or current is None or is_current:
        store.set_current(snap)
        print(f"  CURRENT  -> {snap.path}", flush=True)
    else:
        print(
            f"  CURRENT  unchanged ({current.path}); serve this version with: "
            f"mmembed activate {store.root} {slug}/{version}",
            flush=True,
        )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return job_main("reembed", build_parser(), run, argv)


if __name__ == "__main__":
    from mmembed.options import exit_process

    exit_process(main())
