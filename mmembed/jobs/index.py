"""The index job: a FAISS approximate nearest-neighbour index over corpus embeddings.

The build runs in this process (FAISS uses every core): the quantizer is trained on a sample,
then the store is added one shard at a time, so the only full-corpus object in memory is the
index itself (mmembed/stores/index.py). `mmembed search --index URI` uses it.
"""

from __future__ import annotations

from mmembed.errors import UsageError
from mmembed.jobs.config import IndexConfig
from mmembed.jobs.runner import EXIT_FAILED, EXIT_OK, Job, Outcome
from mmembed.outputs.manifest import library_versions, redact_options
from mmembed.outputs.ownership import refuse_finished


def plan(cfg: IndexConfig) -> dict:
    """Every check before the build. Raises UsageError."""
    from mmembed.outputs.ownership import check_output
    from mmembed.stores.index import INDEX_JOB, METRICS, EmbeddingSource, IndexOutput, IndexParams, require_faiss

    check_output("index", cfg.output, cfg.storage_options, inputs={"--embeddings": cfg.embeddings})
    faiss = require_faiss()
    source = EmbeddingSource.open(cfg.embeddings, cfg.storage_options)
    if source.multi_vector:
        from mmembed.stores.index_multi import multi_vector_params, token_count
    elif source.similarity not in METRICS:
        raise UsageError(
            f"the corpus similarity {source.similarity!r} has no FAISS metric (supported: {', '.join(METRICS)}); "
            "use exact `mmembed search --corpus-embeddings` instead."
        )
    out = IndexOutput(cfg.output, cfg.storage_options)
    existing = out.existing()
    if existing and existing.get("job") != INDEX_JOB:
        raise UsageError(
            f"--output {cfg.output} holds a `{existing.get('job')}` output, not an index; give the index a "
            "directory of its own."
        )
    refuse_finished(cfg.output, cfg.storage_options, cfg.overwrite)
    params = IndexParams(
        kind=cfg.kind, nlist=cfg.nlist, nprobe=cfg.nprobe, m=cfg.m, nbits=cfg.nbits,
        ef_construction=cfg.ef_construction, ef_search=cfg.ef_search, train_size=cfg.train_size,
    )
    if source.multi_vector:
        params = multi_vector_params(params, token_count(source), source.dim)
    else:
        params = params.resolve(source.count, source.dim)
    return {"faiss": faiss, "source": source, "output": out, "params": params}


class IndexJob(Job):
    name = "index"

    def plan(self) -> dict:
        return plan(self.cfg)

    def executor(self, p: dict) -> None:
        return None  # FAISS builds in this process, on every core

    def execute(self, p: dict, ex) -> Outcome:
        import time

        from mmembed.stores.index import IndexBuilder

        started = time.time()
        source = p["source"]
        if source.multi_vector:
            import tempfile

            from mmembed.stores.index_multi import MultiVectorIndexBuilder

            p["workdir"] = tempfile.TemporaryDirectory(prefix="mmembed-index-")
            builder = MultiVectorIndexBuilder(source, p["params"], p["workdir"].name)
            p["index"], p["ids"], vectors = builder.build()
            p["extra"] = {"vectors": vectors}
        else:
            builder = IndexBuilder(source, p["params"])
            p["index"], p["ids"] = builder.build()
        vectors = int(p["index"].ntotal)
        docs = p["ids"].num_rows if source.multi_vector else vectors
        manifest = {
            "source": {
                "uri": source.uri,
                "root": source.root,
                "job": source.manifest.get("job"),
                "finished_at": source.manifest.get("finished_at"),
                "fingerprint": source.fingerprint(),
                "column": source.column,
                "precision": source.model.get("precision") or "float32",
                "files": [{"name": f["name"], "rows": f["rows"]} for f in source.files],
            },
            "model": {
                **{k: source.model.get(k) for k in ("name", "revision", "dim", "normalize", "task", "truncate_dim")},
                # What `search` needs to embed raw queries as the corpus was (reembed records one flag).
                "normalize_flag": source.model.get("normalize_flag", source.model.get("normalize")),
            },
            "similarity_fn_name": source.similarity,
            "metric": builder.metric,
            "normalize_inputs": builder.normalize,
            "index": builder.params.to_dict(),
            "counts": {"records": source.count, "written": docs, "errors": 0, "unaccounted": source.count - docs},
            **({"multi_vector": {**source.model["multi_vector"], "index_vectors": vectors}}
               if source.multi_vector else {}),
            "output": {"uri": self.cfg.output, "storage_options": redact_options(self.cfg.storage_options)},
            "versions": {**library_versions(), "faiss": p["faiss"].__version__},
            "build_s": round(time.time() - started, 3),
        }
        return Outcome(manifest)

    def commit(self, p: dict, manifest: dict) -> dict:
        # The index's files are its own (IndexOutput.commit lists them); it has no error rows or device.
        manifest = {k: v for k, v in manifest.items() if k not in ("files", "error_files", "device_use")}
        try:
            return p["output"].commit(p["index"], p["ids"], manifest, p.get("extra"))
        finally:
            if p.get("workdir") is not None:
                p["workdir"].cleanup()

    def report(self, manifest: dict, output: str) -> str:
        c, m = manifest["counts"], manifest["model"]
        return (
            f"mmembed index: complete in {manifest['duration_s']:.1f} s (build {manifest['build_s']:.1f} s)\n"
            f"  vectors  {c['written']:>10,} of {c['records']:,} from {manifest['source']['root']} "
            f"({manifest['source']['column']})\n"
            f"  index    {manifest['index']}  metric={manifest['metric']} -> {output}\n"
            f"  model    {m.get('name')} @ {m.get('revision')}  dim={m.get('dim')}"
            + (self._per_document(manifest) if manifest.get("multi_vector") else "")
        )

    @staticmethod
    def _per_document(manifest: dict) -> str:
        files = manifest.get("files", {})
        docs = max(manifest["counts"]["written"], 1)
        vectors = files.get("vectors", {}).get("bytes", 0)
        index = sum(f["bytes"] for f in files.values()) - vectors
        return (f"\n  tokens   {manifest['multi_vector']['index_vectors']:,} token vectors of {docs:,} documents; "
                f"per document {index / docs:,.0f} B of token index and ids + {vectors / docs:,.0f} B of vectors")

    def exit_code(self, p: dict, manifest: dict, outcome: Outcome, output: str) -> int:
        return EXIT_OK if manifest["counts"]["unaccounted"] == 0 else EXIT_FAILED
