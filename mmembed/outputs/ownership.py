"""What an output directory may hold, and the only names mmembed ever removes from one.

An `--output` may be missing, empty, or an output this same command wrote before. Anything else is
refused before Ray starts, naming some of the entries mmembed did not write: a user's folder is
never written into, and `--overwrite` removes only names mmembed writes, in a folder that is an
mmembed output. An output must also stay apart from every input: equal to one, inside one
(a rerun would read its own shards as input) or holding one (`--overwrite` would delete it) is
refused.

File names are chosen so that the tools users read outputs with see only results:
`part-*.parquet` are result shards; error shards are `_errors/errors-*.parquet`, which a
`OUT/**/part-*.parquet` glob does not match; a shard being written is `.<name>.<token>.tmp`, which
no `*.parquet` glob matches. Outputs of earlier versions (`_errors/part-*.parquet`, `.tmp-*`) are
still read and cleaned.
"""

from __future__ import annotations

import fnmatch
import os

from mmembed.errors import UsageError
from mmembed.outputs.manifest import MANIFEST_NAME, read_json
from mmembed.storage.fs import filesystem, join_uri, protocol_of

RUN_NAME = "_run.json"
LOCK_NAME = "_lock.json"
ERRORS_DIR = "_errors"
RESULT_GLOB = "part-*.parquet"
ERROR_GLOB = "errors-*.parquet"
LEGACY_ERROR_GLOB = "part-*.parquet"  # error shards of earlier versions (still read, resumed and counted)
TMP_GLOBS = (".*.tmp", ".tmp-*")  # in-progress shards, as named now and by earlier versions

_RECORDS = (MANIFEST_NAME, RUN_NAME, LOCK_NAME)
_SHARDS = (RESULT_GLOB, ERRORS_DIR, *TMP_GLOBS, *_RECORDS)
# The names each command writes at the top of its --output.
OWNED = {
    "embed": (*_SHARDS, "_eval"),  # `mmembed evaluate` records its evaluations of an embed output there
    "rerank": _SHARDS,
    "search": (*_SHARDS, "_query_embeddings"),  # raw queries are embedded into a folder of the search output
    "index": ("index-*.faiss", "ids-*.parquet", *TMP_GLOBS, *_RECORDS),
    "retrieve-rerank": ("corpus_embeddings", "candidates", "reranked", *_RECORDS),
}
MAX_NAMED = 5


def tmp_name(name: str, token: str) -> str:
    """Where a shard is written before it is renamed to `name`."""
    return f".{name}.{token}.tmp"


def owned(job: str, name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in OWNED[job])


def check_output(job: str, output: str, storage_options: dict | None, *, inputs: dict[str, str] | None = None,
                 overwrite: bool = False) -> None:
    """Refuse an --output this command must not write into (exit 2 before Ray starts).

    `inputs` maps each input option (e.g. "--input") to its URI; none may share a path with the output.
    With `overwrite`, also refuse a folder that clear_owned would refuse to clear.
    """
    for flag, uri in (inputs or {}).items():
        if uri:
            check_apart(output, flag, uri)
    fs, root = filesystem(output, storage_options)
    root = root.rstrip("/") or root
    fs.invalidate_cache(root)
    if fs.isfile(root):
        raise UsageError(f"--output {output} is a file; give a directory (missing or empty) for the {job} output.")
    if not fs.exists(root):
        return
    names = sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(root, detail=False))
    foreign = [n for n in names if not owned(job, n)]
    if foreign:
        more = f" and {len(foreign) - MAX_NAMED} more" if len(foreign) > MAX_NAMED else ""
        raise UsageError(
            f"--output {output} holds entries mmembed did not write ({', '.join(foreign[:MAX_NAMED])}{more}). "
            f"mmembed {job} writes only into a missing or empty directory, or one an earlier `mmembed {job}` "
            f"wrote, and never removes what it did not write. Choose another --output, e.g. "
            f"{join_uri(output, 'mmembed-' + job)}."
        )
    if overwrite and set(names) - {LOCK_NAME} and not _claimed(fs, root, names):
        raise _unclaimed(output, names)
    manifest = read_json(join_uri(output, MANIFEST_NAME), storage_options)
    if manifest and manifest.get("job") not in (None, job):
        raise UsageError(
            f"--output {output} holds a `mmembed {manifest.get('job')}` output, not a {job} one; give the {job} "
            "output a directory of its own."
        )
    if RUN_NAME in names and job != "embed":
        raise UsageError(
            f"--output {output} holds an unfinished `mmembed embed` run ({RUN_NAME}); give the {job} output a "
            "directory of its own."
        )


def _claimed(fs, root: str, names) -> bool:
    """A manifest or run record of ours says mmembed wrote this folder (a lease alone does not:
    it is taken before anything else is written, so it vouches for no other file). A folder of
    step outputs (retrieve-rerank's, before its own manifest) is claimed when each step's is."""
    if MANIFEST_NAME in names or RUN_NAME in names:
        return True
    steps = [n for n in names if n != LOCK_NAME]
    return bool(steps) and all(
        fs.isdir(f"{root}/{n}") and (fs.exists(f"{root}/{n}/{MANIFEST_NAME}") or fs.exists(f"{root}/{n}/{RUN_NAME}"))
        for n in steps
    )


def _unclaimed(output: str, names) -> UsageError:
    shown = ", ".join(sorted(n for n in names if n != LOCK_NAME)[:MAX_NAMED])
    return UsageError(
        f"--overwrite: {output} holds {shown} but no {MANIFEST_NAME} or {RUN_NAME} of mmembed's, so mmembed cannot "
        "tell they are its own and removes nothing. Remove them yourself, or choose another --output."
    )


def clear_owned(job: str, output: str, storage_options: dict | None) -> list[str]:
    """--overwrite: remove the names this command writes (never the lease held now); returns them.

    Refuses a folder no record of ours claims: a directory of bare `part-*.parquet` files may be
    another tool's output, and mmembed deletes only what it knows it wrote.
    """
    fs, root = filesystem(output, storage_options)
    root = root.rstrip("/") or root
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return []
    entries = fs.ls(root, detail=False)
    names = {entry.rstrip("/").rsplit("/", 1)[-1]: entry for entry in entries}
    if set(names) - {LOCK_NAME} and not _claimed(fs, root, names):
        raise _unclaimed(output, names)
    removed = []
    for name, entry in sorted(names.items()):
        if name == LOCK_NAME or not owned(job, name):
            continue
        fs.rm(entry, recursive=True)
        removed.append(name)
    fs.invalidate_cache(root)
    return removed


def _location(uri: str) -> tuple[str, str]:
    """(protocol, absolute path without glob or trailing slash) of a URI or local path."""
    proto = protocol_of(uri)
    path = uri.split("://", 1)[1] if "://" in uri else uri
    cut = min((path.index(c) for c in "*?[{" if c in path), default=None)
    if cut is not None:
        path = path[:cut].rsplit("/", 1)[0]
    if proto in ("file", "local"):
        path = os.path.realpath(os.path.expanduser(path))
    return proto, path.rstrip("/") or "/"


def check_apart(output: str, flag: str, uri: str, *, output_flag: str = "--output") -> None:
    out_proto, out = _location(output)
    in_proto, inp = _location(uri)
    if out_proto != in_proto:
        return
    if out == inp:
        where = "is"
    elif out.startswith(inp + "/"):
        where = "is inside"
    elif inp.startswith(out + "/"):
        where = "contains"
    else:
        return
    raise UsageError(
        f"{output_flag} {output} {where} {flag} {uri}: an output must be a directory of its own, apart from "
        "every input (a rerun would read the output as input, and --overwrite would remove inputs). "
        f"Choose an {output_flag} outside the input."
    )


def refuse_finished(output: str, storage_options: dict | None, overwrite: bool) -> None:
    """Refuse an --output that holds a finished run, unless --overwrite replaces it."""
    existing = read_json(join_uri(output, MANIFEST_NAME), storage_options)
    if existing and not overwrite:
        raise UsageError(
            f"{output} already holds a finished run ({existing.get('job')}, {existing.get('finished_at')}). "
            "Choose another --output, or pass --overwrite to replace it."
        )
