"""The retrieve-rerank job: embed + search + rerank over a whole corpus, on one Ray runtime.

Three jobs, each writing its own output and manifest under OUT:
  1. OUT/corpus_embeddings: the embed job (`--task document`) over the corpus with the embedder
     (skipped when --corpus-embeddings points at an existing one),
  2. OUT/candidates: the search job over the raw queries (embedded as encode_query would), the
     exact top --retrieve-k per query,
  3. OUT/reranked: the rerank job over those candidates with the reranker, queries and documents
     looked up by id in --queries and --corpus, keeping the best --top-k,
and OUT/_manifest.json tying them together. Both models are checked before anything runs.
"""

from __future__ import annotations

import sys

from mmembed.jobs import embed, rerank, search
from mmembed.jobs.config import EmbedConfig, RerankConfig, RetrieveRerankConfig, SearchConfig, derive
from mmembed.jobs.runner import EXIT_OK, Job, Outcome, run
from mmembed.outputs.manifest import MANIFEST_NAME, read_json
from mmembed.outputs.ownership import refuse_finished
from mmembed.storage.fs import join_uri

STEPS = ("corpus_embeddings", "candidates", "reranked")
JOBS = {"corpus_embeddings": embed.EmbedJob, "candidates": search.SearchJob, "reranked": rerank.RerankJob}


def plan(cfg: RetrieveRerankConfig) -> dict:
    """The three steps' configurations, checked as far as possible before anything runs."""
    from mmembed.outputs.ownership import check_output

    out = {step: join_uri(cfg.output, step) for step in STEPS}
    check_output("retrieve-rerank", cfg.output, cfg.storage_options, overwrite=cfg.overwrite, inputs={
        "--queries": cfg.queries, "--corpus": cfg.corpus, "--corpus-embeddings": cfg.corpus_embeddings})
    refuse_finished(cfg.output, cfg.storage_options, cfg.overwrite)
    steps = {}
    corpus_embeddings = cfg.corpus_embeddings or out["corpus_embeddings"]
    if not cfg.corpus_embeddings:
        steps["corpus_embeddings"] = derive(EmbedConfig, cfg, input=cfg.corpus, output=corpus_embeddings,
                                            model=cfg.embedder, task="document", overwrite=True)
        embed.plan(steps["corpus_embeddings"])
    steps["candidates"] = derive(SearchConfig, cfg, queries=cfg.queries, corpus_embeddings=corpus_embeddings,
                                 output=out["candidates"], top_k=cfg.retrieve_k, model=cfg.embedder, overwrite=True)
    steps["reranked"] = derive(RerankConfig, cfg, candidates=out["candidates"], queries=cfg.queries,
                               corpus=cfg.corpus, output=out["reranked"], model=cfg.reranker, top_k=cfg.top_k,
                               overwrite=True)
    rerank.load_reranker(steps["reranked"])
    for flag, uri in (("--queries", cfg.queries), ("--corpus", cfg.corpus)):
        rerank.resolve_manifest(uri, flag, cfg.storage_options)
    return {"steps": steps, "outputs": {**out, "corpus_embeddings": corpus_embeddings}}


class RetrieveRerankJob(Job):
    name = "retrieve-rerank"

    def plan(self) -> dict:
        return plan(self.cfg)

    def executor(self, p: dict) -> None:
        return None  # each step runs through the runner itself

    def execute(self, p: dict, ex) -> Outcome | int:
        from mmembed.outputs.ownership import clear_owned

        cfg = self.cfg
        if cfg.overwrite:
            clear_owned("retrieve-rerank", cfg.output, cfg.storage_options)
        for step, step_cfg in p["steps"].items():
            print(f"\nmmembed retrieve-rerank: step {step}", flush=True)
            code = run(JOBS[step](step_cfg))
            if code != EXIT_OK:
                print(f"mmembed retrieve-rerank: step {step} exited with {code}; stopping", file=sys.stderr)
                return code
        final = read_json(join_uri(p["outputs"]["reranked"], MANIFEST_NAME), cfg.storage_options) or {}
        manifest = {
            "models": {"embedder": cfg.embedder, "reranker": cfg.reranker},
            "input": {"queries": cfg.queries, "corpus": cfg.corpus},
            "outputs": p["outputs"],
            "retrieve_k": cfg.retrieve_k,
            "top_k": cfg.top_k,
            "counts": final.get("counts", {}),
        }
        return Outcome(manifest)

    def commit(self, p: dict, manifest: dict) -> dict:
        # Each step's manifest keeps its own shards, resources and versions.
        manifest = {k: v for k, v in manifest.items() if k not in ("files", "error_files", "device_use", "versions")}
        return super().commit(p, manifest)

    def report(self, manifest: dict, output: str) -> str:
        return (f"\nmmembed retrieve-rerank: complete in {manifest['duration_s']:.1f} s -> "
                f"{manifest['outputs']['reranked']}")

    def exit_code(self, p: dict, manifest: dict, outcome: Outcome, output: str) -> int:
        return EXIT_OK  # every step already passed its own error checks
