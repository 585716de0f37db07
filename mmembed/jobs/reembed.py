"""The reembed job: keep a versioned embedding store current.

The model and embedding settings name a version of the store (mmembed/stores/store.py). When that
version already has a committed snapshot, the run is incremental: only records that are new or
whose content hash changed are embedded, unchanged ones are carried over from the version's
latest snapshot, and ids that left the input are dropped. Otherwise every record is embedded
into a new version. Either way the run writes a new snapshot, commits it with its manifest, and
only then moves CURRENT: automatically when the version is the current one (or the store has
none yet), else only with --activate or a later `mmembed activate`.

Two streaming passes, on Ray Data or (a small input, --executor) in this process; neither holds every
id anywhere (mmembed/stores/changes.py):
  1. changes: read -> content hash (CPU pool) -> records and base rows split into id-hash buckets
     (scratch `_diff/`) -> one diff task per bucket -> `_changes/` (id, content_hash, status),
     `_diff/todo/` (records to embed) and `_diff/carry/` (base rows of unchanged records)
  2. embed:   `_diff/todo/` -> the embed job's stages (passing content_hash through), unioned
     with `_diff/carry/` -> shards; `_diff/` is removed before the snapshot commits
"""

from __future__ import annotations

import pyarrow as pa

from mmembed.errors import UsageError
from mmembed.executors.pipeline import CPU, Stage, apply_ray
from mmembed.jobs import embed
from mmembed.jobs.config import EmbedConfig, ReembedConfig, derive
from mmembed.jobs.runner import EXIT_OK, Job, Outcome
from mmembed.outputs.manifest import MANIFEST_NAME, write_json
from mmembed.outputs.runstate import empty_totals
from mmembed.stages.read_pairs import read_parquet, read_parquet_local
from mmembed.stores.changes import CHANGED, NEW, UNCHANGED
from mmembed.stores.store import Snapshot, Store, embedding_settings, model_slug, new_snapshot_id, version_id

CHANGES_DIR = "_changes"
SCRATCH_DIR = "_diff"  # the diff's buckets; removed before the snapshot commits
RESULT_COLUMNS = ["id", "embedding", "modality", "content_hash"]


def _shard_paths(store: Store, snap: Snapshot, key: str = "files") -> list[str]:
    return [store.uri(snap.slug, snap.version, snap.snapshot, f["name"]) for f in snap.manifest.get(key, [])]


def _read(paths: list[str], storage_options: dict, columns: list[str] | None = None, local: bool = False):
    """Parquet shards as a Ray dataset, or (local) as Arrow blocks read in this process."""
    if local:
        return read_parquet_local(paths, storage_options, columns)
    return read_parquet(paths, paths[0], storage_options, columns=columns)


def write_buckets(ds, uri: str, buckets: int, storage_options: dict, local: bool = False) -> None:
    """Write a dataset (local: Arrow blocks) split by id bucket (`uri/bucket=K/*.parquet`), streaming."""
    import pyarrow.parquet as pq
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from mmembed.storage.fs import filesystem
    from mmembed.stores.changes import BUCKET, add_bucket

    fs, _ = filesystem(uri, storage_options)
    root, arrow_fs = fs._strip_protocol(uri), PyFileSystem(FSSpecHandler(fs))
    if local:
        for i, block in enumerate(ds):
            if block.num_rows:
                pq.write_to_dataset(add_bucket(block, buckets), root, partition_cols=[BUCKET], filesystem=arrow_fs,
                                    basename_template=f"part-{i:06d}-{{i}}.parquet")
        return
    ds = apply_ray(ds, [Stage(add_bucket, kwargs={"buckets": buckets}, resources={"num_cpus": 0.25})])
    ds.write_parquet(root, filesystem=arrow_fs, partition_cols=[BUCKET], ray_remote_args={"num_cpus": 0.25})


def diff_buckets(records, base_paths: list[str], base_errors: list[str], buckets: int, out: str, schema: pa.Schema,
                 storage_options: dict, local: bool = False) -> tuple[dict, str]:
    """Diff records carrying (id, content_hash) against a base snapshot's shards, bucket by bucket: in
    Ray tasks, or (local) one bucket after the other in this process.

    Writes `out/_changes/` and, under the scratch directory it returns with the counts, `todo/`
    (the records to embed, with their hash) and `carry/` (the base rows to keep, in `schema`).
    """
    from mmembed.storage.fs import join_uri
    from mmembed.stores.changes import diff_bucket

    scratch = join_uri(out, SCRATCH_DIR)
    write_buckets(records, join_uri(scratch, "new"), buckets, storage_options, local)
    if base_paths:
        base = _read(base_paths, storage_options, columns=["id", "content_hash", "modality", "embedding"], local=local)
        write_buckets(base, join_uri(scratch, "base"), buckets, storage_options, local)
    if base_errors:
        write_buckets(_read(base_errors, storage_options, columns=["id"], local=local),
                      join_uri(scratch, "base_errors"), buckets, storage_options, local)
    args = (scratch, join_uri(out, CHANGES_DIR), schema, storage_options)
    if local:
        results = [diff_bucket(k, *args) for k in range(buckets)]
    else:
        import ray

        # Half a CPU each: at most two buckets per core in memory at once.
        task = ray.remote(diff_bucket).options(num_cpus=0.5)
        results = ray.get([task.remote(k, *args) for k in range(buckets)])
    counts = {NEW: 0, CHANGED: 0, UNCHANGED: 0}
    for c in results:
        for key, n in c.items():
            counts[key] += n
    return counts, scratch


def conform(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    """One schema for the embedded and the carried-over rows: the shard writer concatenates both."""
    return batch.select(schema.names).cast(schema)


class ReembedJob(Job):
    name = "reembed"
    results = "embeddings"

    def __init__(self, cfg: ReembedConfig, **kwargs):
        super().__init__(cfg, **kwargs)
        self.store: Store | None = None

    @property
    def output(self) -> str:
        return self.store.root if self.store else self.cfg.store

    # -- before anything is written --------------------------------------------------------------
    def plan(self) -> dict:
        from mmembed.executors.cluster import check_ray_address
        from mmembed.outputs.ownership import check_apart
        from mmembed.stages.encode import QUANTIZED

        cfg = self.cfg
        if cfg.wait_timeout is not None and not cfg.wait:
            raise UsageError("--wait-timeout needs --wait")
        judgements = None
        if cfg.activate_if_better:
            from mmembed.jobs.evaluate import DEFAULT_K, check_judgements, check_metric

            if cfg.activate:
                raise UsageError("--activate and --activate-if-better disagree; pass one of them")
            if not (cfg.queries and cfg.qrels):
                raise UsageError("--activate-if-better needs --queries and --qrels")
            check_metric(cfg.metric, DEFAULT_K)
            judgements = check_judgements(cfg.queries, cfg.qrels, dict(cfg.storage_options))
        elif cfg.queries or cfg.qrels:
            raise UsageError("--queries and --qrels are for --activate-if-better")
        if cfg.precision in QUANTIZED:
            # Carried-over vectors would need the base snapshot's calibration ranges; not supported yet.
            raise UsageError(f"reembed stores float32 or float16 vectors; --precision {cfg.precision} is for "
                             "`mmembed embed`.")
        check_apart(cfg.store, "--input", cfg.input, output_flag="--store")
        self.store = Store(cfg.store, cfg.storage_options, create=True)
        check_ray_address(cfg.address)
        # The embed job's plan and stages serve each snapshot; the store root stands in for its
        # --output in the plan's checks (a store root never holds a run manifest). Options such as
        # --split-modalities stay off: a store keys its content hashes by record id.
        ecfg = derive(EmbedConfig, cfg, output=self.store.root)
        p = embed.plan(ecfg)
        if p["input"].documents or "pdf" in p["input"].columns:
            # A store diffs records by id and content hash; a PDF's records are its pages, known only once rendered.
            raise UsageError(f"--input {cfg.input} holds PDFs, which reembed does not take yet (a document's pages "
                             "are its records); embed them with `mmembed embed`.")
        return {**p, "embed_cfg": ecfg, "judgements": judgements}

    def lease(self, p: dict):
        # One lease for the whole store root, not per version: CURRENT is store-wide, and two runs of
        # one version would each build on the same base snapshot, so the later commit would silently
        # drop the other's changes. It is taken before the base is chosen, so a run that waited
        # builds on what the holder committed.
        from mmembed.outputs.runstate import RunLock

        cfg = self.cfg
        return RunLock(self.store.root, cfg.storage_options, ttl_s=cfg.lease_seconds,
                       run=f"mmembed reembed of {cfg.input} with {cfg.model}")

    def executor(self, p: dict) -> str:
        return p["executor"]  # the embed plan's choice, for the records of this input

    def acquire(self, lock) -> None:
        lock.acquire(wait=self.cfg.wait, timeout_s=self.cfg.wait_timeout,
                     on_wait=lambda who: print(f"mmembed reembed: waiting for the store's lease: {who}", flush=True))

    # -- the two passes --------------------------------------------------------------------------
    def execute(self, p: dict, ex) -> Outcome:
        cfg, ecfg = self.cfg, p["embed_cfg"]
        store = self.store = Store(cfg.store, cfg.storage_options, create=True)
        settings = embedding_settings(cfg, p)
        slug, version = model_slug(cfg.model), version_id(settings)
        current = store.current_snapshot()
        base = None if cfg.full else store.latest(slug, version)
        snapshot = new_snapshot_id()
        out = store.uri(slug, version, snapshot)
        p.update(current=current, base=base, slug=slug, version=version, snapshot=snapshot, out=out)

        store.ensure_marker()
        store.write_version_info(slug, version, settings)
        from mmembed.stages.encode import embedding_schema
        from mmembed.stages.encode_multi import multi_vector_schema

        schema = (multi_vector_schema(p["dim"], cfg.precision) if p.get("multi_vector")
                  else embedding_schema(p["dim"], cfg.precision)).append(pa.field("content_hash", pa.string()))
        base_rows = base.manifest["counts"]["written"] + base.manifest["counts"]["errors"] if base else 0
        counts, scratch = self.changes_pass(ecfg, p, ex, base, base_rows, out, schema)
        changes = {
            NEW: counts[NEW],
            CHANGED: counts[CHANGED],
            UNCHANGED: counts[UNCHANGED],
            "deleted": base_rows - counts[CHANGED] - counts[UNCHANGED],
        }
        totals = self.embed_pass(ecfg, p, ex, counts, scratch, schema, out)
        changes["embedded"] = totals["written"] - counts[UNCHANGED]
        p["changes"] = changes
        spec = p["input"]
        # Shards are counted as they are read (mmembed/inputs/webdataset.py), other inputs before.
        records = totals["written"] + totals["errors"] if spec.estimated else spec.num_records
        manifest = {
            "store": {
                "root": store.root,
                "model_slug": slug,
                "version": version,
                "snapshot": snapshot,
                "mode": "incremental" if base else "full",
                "base_snapshot": base.snapshot if base else None,
            },
            "model": {"name": cfg.model, **settings, "similarity_fn_name": p["similarity_fn_name"],
                      **({"multi_vector": self.token_counts(p, totals, out)} if p.get("multi_vector") else {})},
            "input": {"uri": cfg.input, "kind": spec.kind, "fingerprint": spec.fingerprint, "records": records},
            "output": {"uri": out, "shard_rows": cfg.shard_rows},
            "changes": changes,
            "counts": {
                "records": records,
                "written": totals["written"],
                "errors": totals["errors"],
                "unaccounted": None if spec.estimated else records - totals["written"] - totals["errors"],
                "by_modality": totals["modalities"],
            },
        }
        return Outcome(manifest, totals, output=out)

    def token_counts(self, p: dict, totals: dict, out: str) -> dict:
        """The snapshot's vectors and bytes per record (embedded and carried over alike), from its shards' footers."""
        from mmembed.jobs.embed import multi_vector_counts
        from mmembed.outputs.runstate import token_totals
        from mmembed.storage.fs import join_uri

        uris = [join_uri(out, f["name"]) for f in totals["files"]]
        return multi_vector_counts(p, {**totals, **token_totals(uris, self.cfg.storage_options)})

    def changes_pass(self, ecfg: EmbedConfig, p: dict, ex, base, base_rows: int, out: str,
                     schema: pa.Schema) -> tuple[dict, str]:
        """Pass 1: hash every record and diff it against the base (see mmembed/stores/changes.py)."""
        from mmembed.executors.cluster import cpu_pool
        from mmembed.executors.pipeline import stream_local
        from mmembed.stages.content_hash import ContentHashStage
        from mmembed.stages.read import ReadStage
        from mmembed.stores.changes import num_buckets

        so = ecfg.storage_options
        hash_stage = [Stage(
            ContentHashStage,
            kwargs={"storage_options": so, "max_bytes": ecfg.max_bytes, "allow_http": ecfg.allow_http,
                    "http_timeout_s": ecfg.http_timeout, "keep_record": True},
            pool=CPU, batch_size=ecfg.preprocess_batch_size, actors=ex.res["num_preprocessors"],
            resources=cpu_pool(ecfg, ex.res),
        )]
        read = ReadStage(p["input"], so, block_rows=ecfg.preprocess_batch_size if ex.local else None)
        hashed = stream_local(read.tables(), hash_stage) if ex.local else apply_ray(read.dataset(), hash_stage)
        buckets = num_buckets(max(p["input"].num_records, base_rows))
        base_paths = _shard_paths(self.store, base) if base else []
        base_errors = _shard_paths(self.store, base, "error_files") if base else []
        return diff_buckets(hashed, base_paths, base_errors, buckets, out, schema, so, ex.local)

    def embed_pass(self, ecfg: EmbedConfig, p: dict, ex, counts: dict, scratch: str, schema: pa.Schema,
                   out: str) -> dict:
        """Pass 2: embed the records the diff left to embed, union the base rows it kept, write one snapshot."""
        from mmembed.storage.fs import filesystem, unstrip

        so = ecfg.storage_options
        fs, root = filesystem(scratch, so)
        fs.invalidate_cache(root)

        def files(sub: str) -> list[str]:
            return sorted(unstrip(fs, f) for f in fs.glob(f"{root.rstrip('/')}/{sub}/part-*.parquet"))

        parts = []
        if counts[NEW] + counts[CHANGED]:
            # The preprocess and encode stages carry each record's content hash through to its result row.
            todo = embed.source(ecfg, p, ex, records=_read(files("todo"), so, local=ex.local))
            parts.append((todo, self.with_stand_ins([
                *embed.stages(ecfg, p, ex.res, passthrough=("content_hash",)),
                Stage(conform, kwargs={"schema": schema}, resources={"num_cpus": 0.25}),
            ])))
        if counts[UNCHANGED]:
            parts.append((_read(files("carry"), so, columns=schema.names, local=ex.local), []))
        sink = ex.sink(out, RESULT_COLUMNS, ecfg)
        if parts:
            totals = ex.write_parts(parts, sink)
        else:
            sink.on_write_start()
            totals = {**empty_totals(), **(sink.result or {})}
        try:
            fs.rm(root, recursive=True)
        except FileNotFoundError:
            pass
        return totals

    # -- the commit ------------------------------------------------------------------------------
    def commit(self, p: dict, manifest: dict) -> dict:
        # Once this manifest exists the snapshot is complete; CURRENT moves after it (conclude).
        write_json(self.store.uri(p["slug"], p["version"], p["snapshot"], MANIFEST_NAME), manifest,
                   self.cfg.storage_options)
        p["snap"] = Snapshot(p["slug"], p["version"], p["snapshot"], manifest)
        return manifest

    def report(self, manifest: dict, output: str) -> str:
        changes, base = manifest["changes"], manifest["store"]["base_snapshot"]
        return super().report(manifest, output) + (
            f"\n  changes  {changes[NEW]:,} new, {changes[CHANGED]:,} changed, {changes[UNCHANGED]:,} unchanged, "
            f"{changes['deleted']:,} deleted; {changes['embedded']:,} embedded ({manifest['store']['mode']}"
            + (f", base snapshot {base})" if base else ")")
        )

    def failure_note(self, p: dict) -> str:
        return f"; snapshot {p['snap'].path} is kept but CURRENT was not moved"

    def conclude(self, p: dict, manifest: dict, code: int) -> int:
        if code != EXIT_OK:
            return code
        current, snap = p["current"], p["snap"]
        is_current = current is not None and (current.slug, current.version) == (snap.slug, snap.version)
        if self.cfg.activate_if_better and current is not None and not is_current:
            return self.gate(p, snap)
        if self.cfg.activate or current is None or is_current:
            self.store.set_current(snap)
            print(f"  CURRENT  -> {snap.path}", flush=True)
        else:
            print(f"  CURRENT  unchanged ({current.path}); serve this version with: "
                  f"mmembed activate {self.store.root} {snap.slug}/{snap.version}", flush=True)
        return code

    def gate(self, p: dict, snap: Snapshot) -> int:
        """--activate-if-better: the new version against CURRENT, under this run's lease on the store."""
        from mmembed.jobs.config import EvaluateConfig, derive
        from mmembed.jobs.gate import decide

        cfg = self.cfg
        ecfg = derive(EvaluateConfig, cfg, root=self.store.root, query_batch_size=None, corpus_block_rows=None)
        queries, qrels = p["judgements"]
        code, _ = decide(ecfg, self.store, snap, queries, qrels, cfg.metric, cfg.min_gain,
                         say=lambda line: print(line, flush=True))
        return code
