"""Stage 4, write: sharded Parquet for results and for error rows.

Result rows go to `part-*.parquet`, error rows to `_errors/errors-*.parquet` (a
`**/part-*.parquet` glob must see results alone), each shard at most `shard_rows` rows. A shard is
written under a hidden temporary name that no `*.parquet` glob matches and renamed into place when
complete, so a crash never leaves a half-written file that reads as output.
The write tasks return only counts and file names; the driver turns them into the manifest.

ShardWriter itself does not import Ray, so the in-process executor writes without paying for
`import ray.data` (benchmarks/RESULTS.md, "A cold job's fixed cost"); the Ray pipelines write through
its Datasink form, `mmembed.stages.write_ray.RayShardWriter`.
"""

from __future__ import annotations

import uuid
from typing import Iterable

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - registers pa.compute
import pyarrow.parquet as pq

from mmembed.models.device_use import STATS_COLUMN, latest
from mmembed.outputs.ownership import ERRORS_DIR, tmp_name
from mmembed.outputs.runstate import empty_totals
from mmembed.storage.fs import filesystem, with_retries

ERROR_SCHEMA = pa.schema([("id", pa.string()), ("stage", pa.string()), ("error", pa.string())])


class ShardWriter:
    """Writes result and error shards; `result_columns` are the columns a result row keeps."""

    def __init__(
        self,
        output: str,
        *,
        result_columns: list[str],
        storage_options: dict | None = None,
        shard_rows: int = 50_000,
        run_token: str | None = None,
        compression: str = "zstd",
    ):
        self.output = output.rstrip("/")
        self.result_columns = result_columns
        self.storage_options = storage_options or {}
        self.shard_rows = shard_rows
        self.run_token = run_token or uuid.uuid4().hex[:8]
        self.compression = compression
        self.result: dict | None = None

    @property
    def min_rows_per_write(self):
        return self.shard_rows

    def on_write_start(self, schema=None) -> None:
        fs, path = filesystem(self.output, self.storage_options)
        fs.makedirs(path, exist_ok=True)
        fs.makedirs(f"{path}/{ERRORS_DIR}", exist_ok=True)

    def write(self, blocks: Iterable, ctx) -> dict:
        fs, root = filesystem(self.output, self.storage_options)
        stats = empty_totals()
        pending: list[pa.Table] = []
        pending_errors: list[pa.Table] = []
        seq = [0]

        def flush(tables: list[pa.Table], errors: bool, final: bool):
            rows = sum(t.num_rows for t in tables)
            while rows >= self.shard_rows or (final and rows):
                table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
                head, tail = table.slice(0, self.shard_rows), table.slice(self.shard_rows)
                name = f"{'errors' if errors else 'part'}-{self.run_token}-{ctx.task_idx:06d}-{seq[0]:04d}.parquet"
                seq[0] += 1
                sub = f"{root}/{ERRORS_DIR}" if errors else root
                self._write_atomic(fs, sub, name, head)
                (stats["error_files"] if errors else stats["files"]).append(
                    {"name": f"{ERRORS_DIR}/{name}" if errors else name, "rows": head.num_rows}
                )
                tables[:] = [tail] if tail.num_rows else []
                rows = tail.num_rows

        for block in blocks:
            table = block if isinstance(block, pa.Table) else _to_arrow(block)
            if table.num_rows == 0:
                continue
            if STATS_COLUMN in table.column_names:
                column = table.column(STATS_COLUMN)
                latest(stats["encoders"], column.filter(column.is_valid()).to_pylist())
            is_error = table.column("error").is_valid()
            ok = table.filter(pa.compute.invert(is_error))
            bad = table.filter(is_error)
            if ok.num_rows:
                ok = ok.select(self.result_columns)
                for m, n in zip(*_value_counts(ok.column("modality"))) if "modality" in ok.column_names else []:
                    stats["modalities"][m] = stats["modalities"].get(m, 0) + n
                stats["written"] += ok.num_rows
                pending.append(ok)
                flush(pending, False, False)
            if bad.num_rows:
                bad = bad.select(["id", "stage", "error"]).cast(ERROR_SCHEMA)
                stats["errors"] += bad.num_rows
                pending_errors.append(bad)
                flush(pending_errors, True, False)
        flush(pending, False, True)
        flush(pending_errors, True, True)
        return stats

    def _write_atomic(self, fs, directory: str, name: str, table: pa.Table) -> None:
        tmp = f"{directory}/{tmp_name(name, uuid.uuid4().hex[:8])}"
        final = f"{directory}/{name}"

        def put():
            with fs.open(tmp, "wb") as f:
                pq.write_table(table, f, compression=self.compression, use_dictionary=dictionary_columns(table))
            fs.mv(tmp, final)

        with_retries(put)

    def on_write_complete(self, write_result) -> None:
        totals = empty_totals()
        for r in write_result.write_returns:
            if not r:
                continue
            latest(totals["encoders"], r.get("encoders", {}).values())
            totals["files"] += r["files"]
            totals["error_files"] += r["error_files"]
            totals["written"] += r["written"]
            totals["errors"] += r["errors"]
            for m, n in r["modalities"].items():
                totals["modalities"][m] = totals["modalities"].get(m, 0) + n
        self.result = totals


def dictionary_columns(table: pa.Table) -> list[str]:
    """The columns worth Parquet's dictionary encoding: all but vectors of floats. Float vectors almost never
    repeat, so their dictionary pages fill, fall back to plain encoding, and are written anyway: a multi-vector
    float32 shard came out 37% smaller without them, a 384-d single-vector one 1% (benchmarks/RESULTS.md)."""
    out = []
    for field in table.schema:
        leaf = field.type
        while pa.types.is_list(leaf) or pa.types.is_large_list(leaf) or pa.types.is_fixed_size_list(leaf):
            leaf = leaf.value_type
        if not pa.types.is_floating(leaf):
            out.append(field.name)
    return out


def _to_arrow(block) -> pa.Table:
    """A Ray block of another format (pandas) as Arrow; only Ray hands those over."""
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(block).to_arrow()


def _value_counts(col: pa.ChunkedArray):
    vc = pa.compute.value_counts(col)
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()
