"""The command line: the `mmembed` console script (here: one subcommand per command, each the parser
and main in pipelines/<command>.py, imported by name) and the option builders those parsers share
(options.py). The top of the library: it may import any room below it, never pipelines/ directly."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(argv), one-line help). Imported lazily so `--help` is instant.
COMMANDS = {
    "embed": ("pipelines.embed", "embed a corpus into sharded Parquet (python -m pipelines.embed)"),
    "demo": ("pipelines.demo", "generate the offline demo corpus, embed it and show the top matches"),
    "rerank": ("pipelines.rerank", "score and rank candidate pairs with a CrossEncoder (python -m pipelines.rerank)"),
    "search": ("pipelines.search", "top-k retrieval: exact, or with --index approximate (python -m pipelines.search)"),
    "index": ("pipelines.index", "build a FAISS ANN index over corpus embeddings (python -m pipelines.index)"),
    "retrieve-rerank": ("pipelines.retrieve_rerank", "embed + search + rerank in one job (python -m pipelines.retrieve_rerank)"),
    "reembed": ("pipelines.reembed", "incremental or full re-embed into a versioned store (python -m pipelines.reembed)"),
    "evaluate": ("pipelines.evaluate", "retrieval quality of a store version on your queries and qrels (ST's metrics)"),
    "versions": ("pipelines.versions", "list an embedding store's versions, counts, dates and CURRENT"),
    "activate": ("pipelines.activate", "point an embedding store's CURRENT at a committed version (--if-better: gated)"),
    "submit": ("pipelines.submit", "submit any mmembed command to a Ray cluster (Ray Job Submission API)"),
}


# subcommand -> its configuration class in mmembed/jobs/config.py, for parse().
CONFIGS = {
    "embed": "EmbedConfig",
    "rerank": "RerankConfig",
    "search": "SearchConfig",
    "index": "IndexConfig",
    "retrieve-rerank": "RetrieveRerankConfig",
    "reembed": "ReembedConfig",
    "evaluate": "EvaluateConfig",
}


def parse(command: str, argv: list) -> object:
    """The typed configuration that `mmembed <command> <argv>` runs with: for code that runs a job
    from a command line of its own (benchmarks, notebooks) through mmembed.jobs."""
    from mmembed.jobs import config

    parser = importlib.import_module(COMMANDS[command][0]).build_parser()
    return config.from_args(getattr(config, CONFIGS[command]), parser.parse_args([str(a) for a in argv]))


def usage() -> str:
    width = max(len(k) for k in COMMANDS)
    lines = ["usage: mmembed <command> [options]   (mmembed <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from mmembed import __version__

        print(f"mmembed {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mmembed: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


def entry() -> None:
    """The `mmembed` console script: main() as its own process (see options.exit_process)."""
    from mmembed.cli.options import exit_process

    exit_process(main())

