"""Crash-safe runs: what an output directory says about the runs that wrote into it.

The protocol, for an output URI on any fsspec filesystem:

- `_lock.json` is a lease. A run creates it exclusively (O_EXCL locally, a conditional
  `If-None-Match: *` PUT on S3) and refreshes its heartbeat while it runs. A second run finds
  it live and refuses. A lease whose holder is gone (same host and its pid is dead, or no
  heartbeat for its TTL) is taken over, so a rerun after a crash needs no manual step.
- `_run.json` records the run's identity (model, revision, prompt, vector settings, input URI
  and fingerprint) and every attempt. A rerun with another identity is refused: it would mix
  two runs' vectors in one output.
- The committed output is exactly the shards that carry their final name (`part-*.parquet`,
  `_errors/errors-*.parquet`, see mmembed/outputs/ownership.py); the writer renames a shard into place only
  once it is complete.
  A rerun reads the ids of those shards, skips them, and writes only the rest, so each id ends
  up in exactly one committed shard. Hidden `.*.tmp` leftovers of a killed writer are removed.
- `_manifest.json` with status `complete` is written last and lists every shard of every attempt.

Ray's `CheckpointConfig` is not used: it filters only file-based `Read` operators (not the
media-listing input), gives at-least-once semantics with a non-file datasink, and keeps a
separate id log; here the shards themselves are the checkpoint, committed atomically.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

import pyarrow as pa

from mmembed.errors import UsageError
from mmembed.outputs.manifest import MANIFEST_NAME, now_iso, read_json, redact_options, write_json
from mmembed.outputs.ownership import (  # noqa: F401 - RUN_NAME and LOCK_NAME are imported from here by the jobs
    ERROR_GLOB,
    ERRORS_DIR,
    LEGACY_ERROR_GLOB,
    LOCK_NAME,
    RESULT_GLOB,
    RUN_NAME,
    TMP_GLOBS,
)
from mmembed.schema import DEFAULT_COLUMNS, PAGE_MARK
from mmembed.storage.fs import filesystem, join_uri, protocol_of, unstrip, with_retries


def empty_totals() -> dict:
    """The totals of a write that wrote nothing: what every job accounts from."""
    return {"files": [], "error_files": [], "written": 0, "errors": 0, "modalities": {}, "encoders": {}}


# What decides the vectors; a rerun that differs in any of these is a different run.
IDENTITY_KEYS = (
    "model", "revision", "prompt", "task", "prompt_name", "normalize", "truncate_dim", "precision",
    "model_kwargs", "processor_kwargs", "split_modalities", "input_uri", "input_fingerprint", "quantization",
    "input_columns", "documents", "multi_vector", "fast_decode",
)


def run_identity(cfg, p: dict) -> dict:
    spec = p["input"]
    return {
        "model": cfg.model,
        "revision": p["revision"],
        "prompt": p["prompt"],
        "task": cfg.task,
        "prompt_name": cfg.prompt_name,
        "normalize": bool(cfg.normalize),
        "truncate_dim": cfg.truncate_dim,
        "precision": cfg.precision,
        "model_kwargs": cfg.model_kwargs,
        "processor_kwargs": cfg.processor_kwargs,
        "split_modalities": bool(cfg.split_modalities),
        "input_uri": cfg.input,
        "input_fingerprint": spec.fingerprint,
        # Only quantised runs carry it, so outputs written before it existed still resume.
        **({"quantization": p["quantization"]} if p.get("quantization") else {}),
        # Likewise only runs that name columns or modalities carry which.
        **({"input_columns": spec.mapping.describe()} if spec.mapping != DEFAULT_COLUMNS else {}),
        **({"documents": p["documents"]} if p.get("documents") else {}),
        **({"multi_vector": p["multi_vector"]} if p.get("multi_vector") else {}),
        **({"fast_decode": p["fast_decode"]} if p.get("fast_decode") else {}),
    }


def _differences(mine: dict, theirs: dict) -> list[str]:
    out = []
    for k in IDENTITY_KEYS:
        if json.dumps(mine.get(k), sort_keys=True, default=str) != json.dumps(theirs.get(k), sort_keys=True, default=str):
            out.append(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} now")
    return out


def committed_shards(output: str, storage_options: dict | None) -> tuple[list[str], list[str]]:
    """URIs of the result and error shards under their final names (never files in progress)."""
    fs, root = filesystem(output, storage_options)
    root = root.rstrip("/")
    # Other processes wrote here: a cached listing (s3fs keeps one per instance) would miss shards.
    fs.invalidate_cache(root)
    fs.invalidate_cache(f"{root}/{ERRORS_DIR}")

    def ls(*patterns):
        return sorted({unstrip(fs, p) for pattern in patterns for p in with_retries(lambda: fs.glob(pattern))})

    errors = ls(f"{root}/{ERRORS_DIR}/{ERROR_GLOB}", f"{root}/{ERRORS_DIR}/{LEGACY_ERROR_GLOB}")
    return ls(f"{root}/{RESULT_GLOB}"), errors


def inspect_output(output: str, identity: dict, storage_options: dict | None, *, overwrite: bool) -> str:
    """'new', 'resume' or 'complete' for this run's identity; raises UsageError on a conflict."""
    manifest = read_json(join_uri(output, MANIFEST_NAME), storage_options)
    run = read_json(join_uri(output, RUN_NAME), storage_options)
    if overwrite:
        return "new"
    recorded = (run or {}).get("identity")
    if recorded is None and manifest is not None:
        raise UsageError(
            f"{output} already holds a finished run ({manifest.get('model', {}).get('name')}, "
            f"{manifest.get('finished_at')}) with no run record to compare against. Choose another --output, "
            "or pass --overwrite to replace it."
        )
    if recorded is not None:
        diff = _differences(identity, recorded)
        if diff:
            what = "a finished run" if manifest else "an unfinished run"
            raise UsageError(
                f"{output} holds {what} with a different identity ({'; '.join(diff)}). Resuming would mix "
                "two runs' vectors in one output. Choose another --output, or pass --overwrite to discard it."
            )
        return "complete" if manifest and manifest.get("status") == "complete" else "resume"
    results, errors = committed_shards(output, storage_options)
    if results or errors:
        raise UsageError(
            f"{output} holds {len(results) + len(errors)} shard(s) but no {RUN_NAME} saying which run wrote "
            "them. Choose another --output, or pass --overwrite to discard them."
        )
    return "new"


def begin_attempt(output: str, identity: dict, storage_options: dict | None, token: str, resumed: bool) -> dict:
    """Record this attempt in `_run.json` and drop half-written shards of killed attempts."""
    fs, root = filesystem(output, storage_options)
    root = root.rstrip("/")
    for sub in (root, f"{root}/{ERRORS_DIR}"):
        fs.invalidate_cache(sub)
        leftovers = {p for pattern in TMP_GLOBS for p in with_retries(lambda sub=sub, pattern=pattern: fs.glob(f"{sub}/{pattern}"))}
        for leftover in sorted(leftovers):
            try:
                fs.rm(leftover)
            except FileNotFoundError:
                pass
    run = (read_json(join_uri(output, RUN_NAME), storage_options) or {}) if resumed else {}
    attempts = list(run.get("attempts", []))
    attempts.append({"run_token": token, "started_at": now_iso(), "host": socket.gethostname(), "pid": os.getpid()})
    run = {"status": "running", "identity": identity, "attempts": attempts,
           "storage_options": redact_options(storage_options)}
    write_json(join_uri(output, RUN_NAME), run, storage_options)
    return run


def drop_error_shards(output: str, storage_options: dict | None) -> int:
    """--retry-errors: remove committed error shards so their ids count as not yet embedded; rows removed.

    The finished manifest goes first: an attempt killed in between leaves an unfinished run whose
    remaining error shards still count as committed, so every id stays in exactly one shard or
    is embedded by the next resume.
    """
    import pyarrow.parquet as pq

    _, error_paths = committed_shards(output, storage_options)
    if not error_paths:
        return 0
    fs, root = filesystem(output, storage_options)
    try:
        with_retries(lambda: fs.rm(f"{root.rstrip('/')}/{MANIFEST_NAME}"))
    except FileNotFoundError:
        pass
    rows = 0
    for uri in error_paths:
        efs, path = filesystem(uri, storage_options)

        def count(path=path, efs=efs):
            with efs.open(path, "rb") as f:
                return pq.ParquetFile(f).metadata.num_rows

        rows += with_retries(count)
        try:
            with_retries(lambda path=path, efs=efs: efs.rm(path))
        except FileNotFoundError:
            pass
    fs.invalidate_cache(f"{root.rstrip('/')}/{ERRORS_DIR}")
    return rows


def finish_attempt(output: str, run: dict, storage_options: dict | None) -> None:
    write_json(join_uri(output, RUN_NAME), {**run, "status": "complete", "finished_at": now_iso()}, storage_options)


# -- The lease ------------------------------------------------------------------------------------
class RunLock:
    """An exclusive, heartbeated lease on an output, held by one driver process at a time."""

    def __init__(self, output: str, storage_options: dict | None = None, *, ttl_s: float = 60.0,
                 run: str | None = None):
        self.uri = join_uri(output, LOCK_NAME)
        self.storage_options = storage_options
        self.ttl_s = ttl_s
        self.run = run  # what holds it, in words, for the message a refused run prints
        self.token = uuid.uuid4().hex
        self.acquired_at = now_iso()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self) -> bytes:
        return json.dumps(
            {"owner": self.token, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time(),
             "heartbeat_at": now_iso(), "ttl_s": self.ttl_s, "acquired_at": self.acquired_at, "run": self.run}
        ).encode()

    def _create(self) -> bool:
        """Create the lock file only if it does not exist; False if it does."""
        fs, path = filesystem(self.uri, self.storage_options)
        data = self._payload()
        if protocol_of(self.uri) == "file":
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            # The lease appears with its content or not at all: a hard link of a finished file
            # fails if the name exists. (An O_EXCL create is visible empty for a moment, and a
            # contender reading it then took it for a corrupt, stale lease and removed it.)
            tmp = f"{path}.{self.token}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError:
                return self._create_exclusive(path, data)  # a filesystem without hard links
            finally:
                os.unlink(tmp)
            return True
        try:
            # s3fs sends If-None-Match: *; filesystems without conditional writes check first.
            with_retries(lambda: fs.pipe_file(path, data, mode="create"))
        except FileExistsError:
            return False
        fs.invalidate_cache(path.rsplit("/", 1)[0])
        return self._read().get("owner") == self.token

    @staticmethod
    def _create_exclusive(path: str, data: bytes) -> bool:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def _read(self) -> dict:
        fs, path = filesystem(self.uri, self.storage_options)
        fs.invalidate_cache(path.rsplit("/", 1)[0])
        try:
            return json.loads(with_retries(lambda: fs.cat_file(path)))
        except FileNotFoundError:
            return {}
        except ValueError:
            return {"corrupt": True}

    def _stale(self, held: dict) -> str | None:
        if not held or held.get("corrupt"):
            return "unreadable lease"
        if held.get("host") == socket.gethostname() and held.get("pid") and not _pid_alive(int(held["pid"])):
            return f"its process {held['pid']} on this host is gone"
        age = time.time() - float(held.get("heartbeat", 0))
        if age > float(held.get("ttl_s", self.ttl_s)):
            return f"no heartbeat for {age:.0f} s"
        return None

    def _try_acquire(self) -> dict | None:
        """Take the lease if it is free or stale: None, else the live holder's lease."""
        fs, path = filesystem(self.uri, self.storage_options)
        for _ in range(3):
            self.acquired_at = now_iso()
            if self._create():
                self._start_heartbeat()
                return None
            held = self._read()
            if not held:
                continue  # released in between
            if self._stale(held) is None:
                return held
            if self._read() != held:
                continue  # someone else took it over meanwhile; judge the new holder afresh
            try:
                fs.rm(path)
            except FileNotFoundError:
                pass
        raise UsageError(f"could not take the lease {self.uri}: other runs keep taking it; try again later")

    def describe(self, held: dict) -> str:
        since = f"since {held['acquired_at']}, " if held.get("acquired_at") else ""
        run = f"; it is {held['run']}" if held.get("run") else ""
        return (f"{self.uri} is held by pid {held.get('pid')} on {held.get('host')} "
                f"({since}last heartbeat {held.get('heartbeat_at')}){run}")

    def acquire(self, *, wait: bool = False, timeout_s: float | None = None, poll_s: float | None = None,
                on_wait=None) -> "RunLock":
        """Take the lease. A live holder refuses it (UsageError), or with `wait` is waited for,
        polled every `poll_s` (default: a quarter of the TTL, at most 5 s), for at most `timeout_s`."""
        deadline = None if timeout_s is None else time.time() + timeout_s
        poll_s = poll_s if poll_s is not None else min(5.0, self.ttl_s / 4)
        announced = None
        while True:
            held = self._try_acquire()
            if held is None:
                return self
            if not wait:
                expires = float(held.get("heartbeat", 0)) + float(held.get("ttl_s", self.ttl_s))
                raise UsageError(
                    f"another run is writing to this output: {self.describe(held)}. Wait for it to finish "
                    f"(or pass --wait where the command has it), or if it is known to be dead, wait until its "
                    f"lease expires (in {max(0, expires - time.time()):.0f} s) and rerun; the rerun resumes its work."
                )
            if deadline is not None and time.time() >= deadline:
                raise UsageError(f"gave up waiting after {timeout_s:g} s: {self.describe(held)}")
            if on_wait is not None and held.get("owner") != announced:
                announced = held.get("owner")
                on_wait(self.describe(held))
            time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.time())))

    def _start_heartbeat(self) -> None:
        def beat():
            fs, path = filesystem(self.uri, self.storage_options)
            while not self._stop.wait(self.ttl_s / 4):
                try:
                    if self._read().get("owner") != self.token:
                        return  # taken over after we stalled; the new holder owns the output now
                    with_retries(lambda: fs.pipe_file(path, self._payload()))
                except Exception:  # noqa: BLE001 - a missed beat is retried at the next tick
                    pass

        self._thread = threading.Thread(target=beat, name="mmembed-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._read().get("owner") == self.token:
            fs, path = filesystem(self.uri, self.storage_options)
            try:
                with_retries(lambda: fs.rm(path))
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- Ray tasks over committed shards ---------------------------------------------------------------
def committed_index(paths: list[str], error_paths: list[str], storage_options: dict | None):
    """(KeyIndex of every id in committed result and error shards, how many); a Ray task with two returns."""
    from mmembed.outputs.ids import KeyIndex, _read_columns

    ids = [
        c.combine_chunks().cast(pa.string())
        for c in (_read_columns(paths, ["id"], storage_options).column("id"),
                  _read_columns(error_paths, ["id"], storage_options).column("id"))
        if len(c)
    ]
    if not ids:
        return KeyIndex.empty(), 0
    ids = pa.concat_arrays(ids)
    return KeyIndex.build(ids, pa.nulls(len(ids), pa.string())), len(ids)


def account(paths: list[str], error_paths: list[str], storage_options: dict | None) -> dict:
    """Rows per shard, modality counts and duplicate ids over all committed shards (a Ray task)."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from mmembed.outputs.ids import id_keys

    totals = {**empty_totals(), "duplicate_ids": 0, "pages": 0}
    his, los = [], []
    for kind, group in (("files", paths), ("error_files", error_paths)):
        for uri in group:
            fs, path = filesystem(uri, storage_options)

            def read(path=path, fs=fs):
                with fs.open(path, "rb") as f:
                    cols = ["id", "modality"] if kind == "files" else ["id"]
                    pf = pq.ParquetFile(f)
                    return pf.read(columns=cols), pf.metadata

            t, meta = with_retries(read)
            if kind == "files":
                _count_token_vectors(meta, totals)
            name = uri.rstrip("/").rsplit("/", 1)[-1]
            totals[kind].append({"name": f"{ERRORS_DIR}/{name}" if kind == "error_files" else name, "rows": t.num_rows})
            totals["written" if kind == "files" else "errors"] += t.num_rows
            if kind == "files" and t.num_rows:
                vc = pc.value_counts(t.column("modality"))
                for m, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
                    totals["modalities"][m] = totals["modalities"].get(m, 0) + n
            # PDF pages (ids `<document>#page=<n>`), written or failed.
            totals["pages"] += pc.sum(pc.match_substring(t.column("id"), PAGE_MARK)).as_py() or 0
            hi, lo = id_keys(t.column("id"))
            his.append(hi)
            los.append(lo)
    if his:
        hi, lo = np.concatenate(his), np.concatenate(los)
        order = np.lexsort((lo, hi))
        hi, lo = hi[order], lo[order]
        totals["duplicate_ids"] = int(np.sum((hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])))
    return totals


def token_totals(uris: list[str], storage_options: dict | None) -> dict:
    """{"token_values", "token_bytes"} of multi-vector shards, read from their footers alone."""
    import pyarrow.parquet as pq

    totals: dict = {}
    for uri in uris:
        fs, path = filesystem(uri, storage_options)

        def footer(fs=fs, path=path):
            with fs.open(path, "rb") as f:
                return pq.ParquetFile(f).metadata

        _count_token_vectors(with_retries(footer), totals)
    return totals


def _count_token_vectors(meta, totals: dict) -> None:
    """A multi-vector shard's stored values and bytes, from its Parquet footer (no vector is read): the
    `embedding` column of lists of vectors has one leaf column, `embedding.list.element.list.element`."""
    for j in range(meta.num_columns):
        path = meta.schema.column(j).path
        if path.startswith("embedding.") and path.count("list") == 2:
            for g in range(meta.num_row_groups):
                col = meta.row_group(g).column(j)
                totals["token_values"] = totals.get("token_values", 0) + col.num_values
                totals["token_bytes"] = totals.get("token_bytes", 0) + col.total_compressed_size


def drop_committed(batch: pa.Table, index) -> pa.Table:
    """The records of `batch` that no committed shard holds. `index` is a KeyIndex, or on Ray the
    mmembed.outputs.ids.IndexRef that each worker fetches once."""
    index = index.get() if hasattr(index, "get") else index
    return batch.filter(pa.array(~index.lookup(batch.column("id"))[0]))
