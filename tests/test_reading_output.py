"""The README's "Reading the output" snippets, run as written on a real output with real clients
(DuckDB, Polars, LanceDB, pyarrow) and the real all-MiniLM-L6-v2: each ranks the sourdough documents
first, and none reads an error shard or a shard in progress."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_job

README = Path(__file__).resolve().parent.parent / "README.md"

DOCS = {
    "bread-1": "Sourdough bread needs an active starter, a long cold proof and a very hot oven.",
    "bread-2": "To bake sourdough, feed the starter, mix the dough, fold it and let it rise overnight.",
    "tax": "File your quarterly tax return before the deadline to avoid a penalty.",
    "fish": "Tropical aquarium fish need stable water temperature and regular water changes.",
    "cars": "Check the tyre pressure and the oil level before a long drive.",
    "music": "The orchestra rehearsed the second movement of the symphony twice.",
}


def snippets() -> list[str]:
    text = README.read_text()
    section = text.split("## Reading the output", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def output(tmp_path_factory, minilm_path):
    root = tmp_path_factory.mktemp("read")
    ids = [*DOCS, "empty"]
    pq.write_table(pa.table({"id": ids, "text": [*DOCS.values(), "   "]}), root / "m.parquet")
    out = root / "out"
    argv = ["--input", root / "m.parquet", "--output", out, "--model", minilm_path, "--executor", "local",
            "--shard-rows", 2]
    assert run_job("pipelines.embed", argv) == 0
    # A shard in progress, as a concurrent or killed writer leaves it: no reader may see its rows.
    (out / ".part-zzz.parquet.deadbeef.tmp").write_bytes((out / sorted(p.name for p in out.glob("part-*"))[0]).read_bytes())
    return out


def test_every_readme_snippet_runs_and_ranks_sourdough_first(output, minilm_path):
    blocks = snippets()
    assert len(blocks) == 6
    ns = {"OUT": str(output), "MODEL": minilm_path}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), ns)  # noqa: S102 - the documentation under test
    for name in ("top_duckdb", "top_duckdb_array", "top_polars", "top_lancedb", "top_pyarrow"):
        assert set(ns[name][:2]) == {"bread-1", "bread-2"}, (name, ns[name])
    committed = ns["committed"]
    assert sorted(committed.column("id").to_pylist()) == sorted(DOCS)
    assert ns["errors"].column("id").to_pylist() == ["empty"]
    assert ns["results"].num_rows == len(DOCS)


def test_globs_of_result_shards_see_results_only(output):
    import duckdb
    import polars as pl

    for rows in (
        duckdb.sql(f"SELECT id FROM read_parquet('{output}/**/part-*.parquet')").fetchall(),
        duckdb.sql(f"SELECT id FROM read_parquet('{output}/*.parquet')").fetchall(),
        [(i,) for i in pl.read_parquet(f"{output}/**/part-*.parquet")["id"].to_list()],
    ):
        assert sorted(r[0] for r in rows) == sorted(DOCS)
