"""The search job: top-k retrieval of queries against a corpus embedded by `mmembed embed`.

Queries are either query embeddings written by `mmembed embed --task query`, or raw query
records that this job first embeds with the embed job, as `encode_query` would, into
OUTPUT/_query_embeddings. Exact search streams the corpus shards block by block on each actor
(stages/search.py, GPU when present); with --index each actor loads the FAISS index of `mmembed
index` instead (stages/index_search.py). The output (query_id, doc_id, score, rank) is a
candidates dataset for `mmembed rerank --queries Q --corpus C`.
"""

from __future__ import annotations

from mmembed.errors import UsageError
from mmembed.executors.pipeline import DEVICE, Stage
from mmembed.jobs.config import EmbedConfig, SearchConfig, derive
from mmembed.jobs.embed import EmbedJob
from mmembed.jobs.embed import plan as embed_plan
from mmembed.jobs.runner import Job, Outcome, run
from mmembed.outputs.manifest import MANIFEST_NAME, read_json
from mmembed.outputs.ownership import refuse_finished
from mmembed.storage.fs import join_uri

RESULT_COLUMNS = ["query_id", "doc_id", "score", "rank"]
QUERY_EMBEDDINGS = "_query_embeddings"
SIMILARITIES = ("cosine", "dot", "euclidean", "manhattan")


# --------------------------------------------------------------------------------------------
# Before Ray starts
# --------------------------------------------------------------------------------------------
def embed_manifest(uri: str, storage_options: dict) -> dict | None:
    """The manifest of a finished embed job at uri, or None (also when uri is a file, e.g. a query manifest)."""
    try:
        m = read_json(join_uri(uri, MANIFEST_NAME), storage_options)
    except (NotADirectoryError, IsADirectoryError):
        return None
    # A store snapshot (reembed) has the same shards and model record as an embed output.
    return m if m and m.get("job") in ("embed", "reembed") and m.get("status") == "complete" else None


def shard_uris(uri: str, manifest: dict, key: str = "files") -> list[str]:
    return [join_uri(uri, f["name"]) for f in manifest.get(key, [])]


def query_embed_config(cfg: SearchConfig, corpus_model: dict) -> EmbedConfig:
    """The embed job for raw queries: encode_query, normalised and truncated as the corpus was."""
    return derive(EmbedConfig, cfg, input=cfg.queries, output=join_uri(cfg.output, QUERY_EMBEDDINGS), task="query",
                  overwrite=True,
                  # A store snapshot records one normalize (the flag or the model's Normalize module).
                  normalize=bool(corpus_model.get("normalize_flag", corpus_model.get("normalize"))),
                  truncate_dim=corpus_model.get("truncate_dim") or None)


def plan(cfg: SearchConfig) -> dict:
    from mmembed.outputs.ownership import check_output

    check_output("search", cfg.output, cfg.storage_options, overwrite=cfg.overwrite, inputs={
        "--queries": cfg.queries, "--corpus-embeddings": cfg.corpus_embeddings, "--index": cfg.index})
    if cfg.rescore_multiplier < 0:
        raise UsageError("--rescore-multiplier must be 0 (no rescoring) or more.")
    if cfg.index:
        from mmembed.stores.index import index_as_corpus

        corpus = index_as_corpus(cfg.index, cfg.corpus_embeddings, cfg.storage_options, nprobe=cfg.nprobe,
                                 ef_search=cfg.ef_search)
    elif not cfg.corpus_embeddings:
        raise UsageError("pass --corpus-embeddings (exact search) or --index (approximate search).")
    elif cfg.nprobe or cfg.ef_search:
        raise UsageError("--nprobe and --ef-search tune an approximate search; pass --index too.")
    else:
        corpus = embed_manifest(cfg.corpus_embeddings, cfg.storage_options)
    if corpus is None:
        raise UsageError(
            f"--corpus-embeddings {cfg.corpus_embeddings} is not a finished `mmembed embed` output (no complete "
            "_manifest.json); embed the corpus first with `mmembed embed --task document`."
        )
    cmodel = corpus["model"]
    similarity = cmodel.get("similarity_fn_name") or "cosine"  # ST's default when a model names none
    multi = bool(cmodel.get("multi_vector"))
    if cfg.candidate_tokens is not None and not (multi and cfg.index):
        raise UsageError("--candidate-tokens tunes an approximate search of a multi-vector index; pass such an --index.")
    if multi:
        if cmodel["multi_vector"].get("task") == "query":
            raise UsageError(f"--corpus-embeddings {cfg.corpus_embeddings} were embedded as queries (--task query); "
                             "embed the corpus as documents.")
    elif similarity not in SIMILARITIES:
        raise UsageError(f"corpus similarity {similarity!r} is not supported by search (supported: {SIMILARITIES}).")
    files = corpus.get("uris") or shard_uris(cfg.corpus_embeddings, corpus)
    if not files or not corpus["counts"].get("written"):
        raise UsageError(f"--corpus-embeddings {cfg.corpus_embeddings} holds no embeddings.")
    queries = embed_manifest(cfg.queries, cfg.storage_options)
    if queries is not None:
        if cfg.model:
            raise UsageError(f"--queries {cfg.queries} are already embeddings; drop --model.")
        qmodel = queries["model"]
        if bool(qmodel.get("multi_vector")) != multi:
            raise UsageError(f"--queries {cfg.queries} and the corpus are not both multi-vector embeddings; embed "
                             "both with the same model.")
        if (qmodel.get("name"), qmodel.get("revision")) != (cmodel.get("name"), cmodel.get("revision")):
            raise UsageError(
                f"query embeddings come from {qmodel.get('name')} @ {qmodel.get('revision')} but the corpus from "
                f"{cmodel.get('name')} @ {cmodel.get('revision')}; embed both with the same model."
            )
        embed_cfg = None
        query_records = queries["counts"]["records"]
    elif not cfg.model:
        raise UsageError(
            f"--queries {cfg.queries} are not embeddings written by `mmembed embed` (no complete _manifest.json); "
            f"pass --model {cmodel.get('name')} to embed them as queries."
        )
    else:
        if cfg.model != cmodel.get("name"):
            raise UsageError(
                f"--model {cfg.model} differs from the model that embedded the corpus ({cmodel.get('name')}); "
                "query and corpus vectors must come from the same model."
            )
        embed_cfg = query_embed_config(cfg, cmodel)
        query_records = embed_plan(embed_cfg)["input"].num_records
        qmodel = cmodel
    if queries is not None and qmodel.get("quantization"):
        raise UsageError(
            f"--queries {cfg.queries} hold {qmodel.get('precision')} vectors; queries must be float (the search "
            "quantises them with the corpus ranges itself). Embed them without --precision, or pass raw queries."
        )
    if qmodel.get("dim") != cmodel.get("dim"):
        raise UsageError(f"query dim {qmodel.get('dim')} != corpus dim {cmodel.get('dim')}.")
    refuse_finished(cfg.output, cfg.storage_options, cfg.overwrite)
    return {
        "corpus": corpus,
        "corpus_files": files,
        "similarity": similarity,
        "dim": cmodel["dim"],
        "queries": queries,
        "query_records": query_records,
        "embed_cfg": embed_cfg,
        "multi_vector": multi,
    }


# --------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------
def source(cfg: SearchConfig, queries_uri: str, queries: dict, local: bool = False, multi_vector: bool = False):
    """Query rows: the query embeddings and the query job's error rows (which stay error rows), each
    brought to one layout before the union; a Ray dataset, or Arrow blocks read in this process."""
    from mmembed.executors.pipeline import apply_ray
    from mmembed.stages.read_pairs import read_parquet, read_parquet_local
    from mmembed.stages.search import as_query_rows

    parts = [shard_uris(queries_uri, queries), shard_uris(queries_uri, queries, "error_files")]
    if local:
        return (as_query_rows(t, multi_vector) for t in read_parquet_local([p for paths in parts for p in paths],
                                                                           cfg.storage_options))
    datasets = [apply_ray(read_parquet(paths, queries_uri, cfg.storage_options),
                          [Stage(as_query_rows, kwargs={"multi_vector": multi_vector})])
                for paths in parts if paths]
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def stages(cfg: SearchConfig, p: dict, res: dict) -> list:
    """One stage: the exact scan over the corpus shards, or the index."""
    from mmembed.executors.cluster import device_pool
    from mmembed.stages.search import SearchStage

    pool = {"pool": DEVICE, "batch_size": cfg.query_batch_size, "actors": res["num_encoders"]}
    if cfg.index:
        from mmembed.stages.index_search import IndexSearchStage
        from mmembed.stages.index_search_maxsim import MaxSimIndexSearchStage

        multi = {"candidate_tokens": cfg.candidate_tokens} if cfg.candidate_tokens else {}
        # FAISS on CPU: the actor takes the encoder's CPUs, never a GPU.
        return [Stage(MaxSimIndexSearchStage if p.get("multi_vector") else IndexSearchStage, args=(cfg.index,),
                      kwargs={"dim": p["dim"], "top_k": cfg.top_k, "storage_options": cfg.storage_options,
                              "nprobe": cfg.nprobe, "ef_search": cfg.ef_search, **multi},
                      resources={"num_cpus": device_pool(cfg, res)["num_cpus"]}, **pool)]
    if p.get("multi_vector"):
        from mmembed.stages.search_maxsim import MAXSIM_BLOCK_DOCS, MaxSimSearchStage

        return [Stage(MaxSimSearchStage, args=(p["corpus_files"],), kwargs={
            "dim": p["dim"], "top_k": cfg.top_k, "similarity_fn_name": p["similarity"],
            "storage_options": cfg.storage_options, "device": res["device"],
            "block_rows": min(cfg.corpus_block_rows, MAXSIM_BLOCK_DOCS),
        }, resources=device_pool(cfg, res), **pool)]
    return [Stage(SearchStage, args=(p["corpus_files"],), kwargs={
        "dim": p["dim"],
        "top_k": cfg.top_k,
        "similarity_fn_name": p["similarity"],
        "storage_options": cfg.storage_options,
        "block_rows": cfg.corpus_block_rows,
        "device": res["device"],
        "quantization": p["corpus"]["model"].get("quantization"),
        "rescore_multiplier": cfg.rescore_multiplier,
    }, resources=device_pool(cfg, res), **pool)]


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------
class SearchJob(Job):
    name = "search"

    def plan(self) -> dict:
        return plan(self.cfg)

    def executor(self, p: dict) -> str:
        from mmembed.executors.cluster import InputSize, choose_executor

        # Sized by the queries (raw queries are embedded first, by a job that makes the same choice).
        return choose_executor(self.cfg, InputSize(p["query_records"], ("text",)), standin=bool(self.replacements))

    def execute(self, p: dict, ex) -> Outcome | int:
        from mmembed.outputs.ownership import clear_owned

        cfg = self.cfg
        if cfg.overwrite:
            clear_owned("search", cfg.output, cfg.storage_options)
        queries_uri, queries = cfg.queries, p["queries"]
        if p["embed_cfg"] is not None:
            rc = run(EmbedJob(p["embed_cfg"]))
            queries_uri = p["embed_cfg"].output
            queries = embed_manifest(queries_uri, cfg.storage_options)
            if queries is None:
                return rc or 1
        sink = ex.sink(cfg.output, RESULT_COLUMNS, cfg)
        totals = ex.write(source(cfg, queries_uri, queries, ex.local, p["multi_vector"]),
                          self.with_stand_ins(stages(cfg, p, ex.res)), sink)
        records = queries["counts"]["records"]
        per_query = min(cfg.top_k, p["corpus"]["counts"]["written"])
        cmodel = p["corpus"]["model"]
        manifest = {
            "model": {**{k: cmodel.get(k) for k in ("name", "revision", "dim", "normalize")},
                      "similarity_fn_name": p["similarity"], "precision": cmodel.get("precision"),
                      "rescored": bool((cmodel.get("quantization") or {}).get("float_column")
                                       and cfg.rescore_multiplier),
                      **({"multi_vector": True} if p["multi_vector"] else {})},
            "input": {
                "queries": cfg.queries,
                "query_embeddings": queries_uri,
                "corpus_embeddings": p["corpus"].get("source_uri", cfg.corpus_embeddings),
                "index": cfg.index and {"uri": cfg.index, "nprobe": cfg.nprobe, "ef_search": cfg.ef_search},
                "corpus_records": p["corpus"]["counts"]["written"],
                "records": records,
            },
            "output": {"uri": cfg.output, "top_k": cfg.top_k, "columns": RESULT_COLUMNS},
            "counts": {
                "records": records,
                "written": totals["written"],
                "errors": totals["errors"],
                "unaccounted": records - totals["errors"] - totals["written"] // max(per_query, 1),
            },
        }
        return Outcome(manifest, totals)
