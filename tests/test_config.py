"""The job skeleton: typed configurations from the command line, and which code may import which."""

from __future__ import annotations

import ast
import dataclasses
import importlib
from pathlib import Path

import pytest

from mmembed import cli
from mmembed.jobs import config

ROOT = Path(__file__).resolve().parent.parent
# The smallest command line each job parses.
MINIMAL = {
    "embed": ["--input", "i", "--output", "o", "--model", "m"],
    "rerank": ["--candidates", "c", "--output", "o", "--model", "m"],
    "search": ["--queries", "q", "--corpus-embeddings", "c", "--output", "o", "--top-k", "3"],
    "index": ["--embeddings", "e", "--output", "o"],
    "retrieve-rerank": ["--queries", "q", "--corpus", "c", "--output", "o", "--embedder", "e", "--reranker", "r"],
    "reembed": ["--input", "i", "--store", "s", "--model", "m"],
    "evaluate": ["root", "--queries", "q", "--qrels", "r"],
}


@pytest.mark.parametrize("command", sorted(MINIMAL))
def test_every_option_has_a_field_and_the_same_default(command, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    parser = importlib.import_module(cli.COMMANDS[command][0]).build_parser()
    args = parser.parse_args(MINIMAL[command])
    cfg = cli.parse(command, MINIMAL[command])
    assert dataclasses.is_dataclass(cfg) and type(cfg).__name__ == cli.CONFIGS[command]
    for name, value in vars(args).items():
        assert getattr(cfg, name) == value, name
    # A field the parser lacks is not an option of this command; its default is the job's own.
    defaults = config.defaults(type(cfg))
    for action in parser._actions:
        if action.dest in defaults and action.default is not None and not action.required:
            assert defaults[action.dest] == action.default, f"{command} --{action.dest}: parser and config disagree"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.output = "elsewhere"


def test_an_option_without_a_field_is_refused():
    args = cli.parse("embed", MINIMAL["embed"])
    ns = type("Namespace", (), {})()
    ns.__dict__.update({**dataclasses.asdict(args), "no_such_option": 1})
    with pytest.raises(TypeError, match="no_such_option"):
        config.from_args(config.EmbedConfig, ns)


def test_derive_takes_shared_options_and_explicit_values_win():
    search = cli.parse("search", [*MINIMAL["search"], "--model", "m", "--max-bytes", "7", "--batch-size", "5",
                                  "--prompt-name", "query"])
    embed = config.derive(config.EmbedConfig, search, input="q", output="o/q", task="query")
    assert (embed.max_bytes, embed.batch_size, embed.prompt_name, embed.model) == (7, 5, "query", "m")
    assert (embed.input, embed.task, embed.split_modalities) == ("q", "query", False)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_entry_points_stay_thin_and_nothing_imports_them():
    entry_points = sorted((ROOT / "pipelines").glob("[!_]*.py"))
    assert entry_points
    for path in entry_points:
        assert len(path.read_text().splitlines()) <= 100, f"{path.name} is no longer a parser and a main"
        assert not {m for m in _imports(path) if m.startswith("pipelines")}, f"{path.name} imports another entry point"
    for folder in ("mmembed", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            bad = {m for m in _imports(path) if m == "pipelines" or m.startswith("pipelines.")}
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_jobs_never_call_map_batches_themselves():
    """Every Ray Data operator of a job comes from its stage list, applied by mmembed/executors/pipeline.py."""
    for path in (ROOT / "mmembed" / "jobs").glob("*.py"):
        text = path.read_text()
        assert "map_batches" not in text and "ActorPoolStrategy" not in text, path.name


def test_ray_is_bounded_at_the_version_tested_and_reads_use_named_parameters(ray_session, tmp_path):
    """Ray 2.64 removes `ray_remote_args` where 2.60 deprecates it: the reads pass named parameters, and
    pyproject bounds Ray at the last version tested (constraints.txt)."""
    import warnings

    import pyarrow as pa
    import pyarrow.parquet as pq
    import tomllib
    from packaging.requirements import Requirement
    from ray.util.annotations import RayDeprecationWarning

    from mmembed.executors.pipeline import CPU, DEVICE, Stage, apply_ray
    from mmembed.inputs.discover import discover
    from mmembed.stages.read import ReadStage
    from mmembed.stages.read_pairs import read_parquet

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_req = next(Requirement(d) for d in deps if Requirement(d).name == "ray")
    tested = next(line.split("==")[1].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()
                  if line.startswith("ray=="))
    assert any(s.operator in ("<", "<=") for s in ray_req.specifier), ray_req
    assert ray_req.specifier.contains(tested) and not ray_req.specifier.contains("2.64.0")
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), manifest)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RayDeprecationWarning)
        ds = ReadStage(discover(str(manifest))).dataset()
        read_parquet([str(manifest)], str(manifest))
        # Pools as every job declares them, applied in the one place that calls map_batches.
        apply_ray(ds, [Stage(_Identity, pool=CPU, actors=1, resources={"num_cpus": 0.25}),
                       Stage(_Identity, pool=DEVICE, actors=1, resources={"num_cpus": 0.25, "num_gpus": 0}),
                       Stage(_identity, resources={"num_cpus": 0.25})])


class _Identity:
    def __call__(self, batch):
        return batch


def _identity(batch):
    return batch
