"""Versioned embedding stores: `<root>/<model-slug>/<version>/<snapshot>/…` and a CURRENT pointer.

    <root>/_mmembed_store.json                 marks the root as a store (written by the first run)
    <root>/CURRENT                             {"path": "<slug>/<version>/<snapshot>", ...}
    <root>/<slug>/<version>/_version.json      the model and embedding settings of the version
    <root>/<slug>/<version>/<snapshot>/        one run's output: part-*.parquet (id, embedding,
                                               modality, content_hash), _errors/, _changes/,
                                               _manifest.json, and _eval/<key>.json: its evaluations
                                               (`mmembed evaluate`, keyed by the queries and qrels)
    <root>/_decisions/<time>-<slug>--<version>.json   each `--if-better` gate's decision: both figures

A version is named after the model revision and the embedding settings, so the same model and
settings always map to the same version; each run writes a new snapshot of it. A snapshot counts
only once its `_manifest.json` says "complete", and CURRENT is rewritten only after that, in one
small atomic write: readers that follow CURRENT never see a half-built snapshot, and a crashed
run leaves an uncommitted snapshot directory that nothing points at.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field

from mmembed.errors import UsageError
from mmembed.outputs.manifest import MANIFEST_NAME, now_iso, read_json, write_json
from mmembed.outputs.runstate import LOCK_NAME
from mmembed.schema import DEFAULT_COLUMNS
from mmembed.storage.fs import filesystem, join_uri, unstrip

STORE_MARKER = "_mmembed_store.json"
CURRENT_NAME = "CURRENT"
VERSION_INFO = "_version.json"
EVAL_DIR = "_eval"
DECISIONS_DIR = "_decisions"
STORE_FORMAT = "mmembed-store"
LAYOUT = 1


class StoreError(UsageError):
    """The store root, version or snapshot asked for is not usable; nothing was modified."""


def model_slug(name_or_path: str) -> str:
    """A directory name for a model: `org/name` -> `org--name`, a local path -> `parent--name`."""
    name = name_or_path.rstrip("/")
    if "://" in name or name.startswith((".", "/", "~")):
        # A local directory is often named `model` or a hash; its parent tells models apart.
        name = "/".join(name.rsplit("/", 2)[-2:])
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.replace("/", "--")).strip("-.") or "model"


def embedding_settings(args, p: dict) -> dict:
    """Everything that changes the vectors a model writes, from the embed options and plan."""
    return {
        "model": args.model,
        "revision": p["revision"],
        "task": args.task,
        "prompt": p["prompt"],
        "dim": p["dim"],
        "truncate_dim": args.truncate_dim,
        "precision": args.precision,
        "normalize": bool(args.normalize or p["has_normalize_module"]),
        "model_kwargs": args.model_kwargs,
        "processor_kwargs": args.processor_kwargs,
        "transport_dtype": args.transport_dtype,
        # Only a store fed other columns or fewer modalities records which: earlier versions keep their ids.
        **({"input_columns": p["input"].mapping.describe()} if p["input"].mapping != DEFAULT_COLUMNS else {}),
        **({"documents": p["documents"]} if p.get("documents") else {}),
        # Only multi-vector versions record the side and token pooling: single-vector versions keep their ids.
        **({"multi_vector": {k: p["multi_vector"][k] for k in ("task", "token_pooling")}}
           if p.get("multi_vector") else {}),
    }


def version_id(settings: dict) -> str:
    """`<revision>-<digest of the settings>`: stable for the same model and settings."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    rev = re.sub(r"[^A-Za-z0-9._-]+", "-", str(settings.get("revision") or "main"))[:24].strip("-.")
    return f"{rev or 'rev'}-{digest}"


def new_snapshot_id() -> str:
    """Sortable by time (microseconds), unique across concurrent runs."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:6]


@dataclass
class Snapshot:
    slug: str
    version: str
    snapshot: str
    manifest: dict = field(default_factory=dict)

    @property
    def path(self) -> str:
        return f"{self.slug}/{self.version}/{self.snapshot}"


class Store:
    """An embedding store at `root` (local path or fsspec URI).

    Opening never writes: a root that exists but is not a store is refused, and `create=True`
    only accepts a root that is missing or empty (the marker is written by `ensure_marker`, when
    a run is about to write its first file).
    """

    def __init__(self, root: str, storage_options: dict | None = None, *, create: bool = False):
        self.root = root.rstrip("/") or root
        self.storage_options = storage_options or {}
        self.fs, self.path = filesystem(self.root, self.storage_options)
        if self.fs.isfile(self.path):
            raise StoreError(f"{root} is a file, not an embedding store directory")
        marker = read_json(self.uri(STORE_MARKER), self.storage_options)
        if marker is not None:
            if marker.get("format") != STORE_FORMAT:
                raise StoreError(f"{root} has a {STORE_MARKER} that is not an mmembed store marker: {marker}")
            self.exists = True
            return
        self.exists = False
        if not self.fs.exists(self.path):
            if create:
                return
            raise StoreError(f"no embedding store at {root}: the path does not exist")
        # A run waiting for the store's lease finds the lock of the run that is creating the store.
        if create and all(e.rstrip("/").rsplit("/", 1)[-1] == LOCK_NAME for e in self.fs.ls(self.path, detail=False)):
            return
        raise StoreError(
            f"{root} is not an mmembed embedding store (no {STORE_MARKER}). Point --store at a store "
            "created by `mmembed reembed`, or at a new or empty directory to create one."
        )

    def uri(self, *parts: str) -> str:
        out = self.root
        for part in parts:
            out = join_uri(out, part)
        return out

    def _write_json(self, payload: dict, *parts: str) -> None:
        uri = self.uri(*parts)
        # Object stores have no directories; a local root needs its parents made first.
        self.fs.makedirs(self.fs._parent(self.fs._strip_protocol(uri)), exist_ok=True)
        write_json(uri, payload, self.storage_options)

    def ensure_marker(self) -> None:
        if not self.exists:
            self._write_json(
                {"format": STORE_FORMAT, "layout": LAYOUT, "created_at": now_iso()},
                STORE_MARKER,
            )
            self.exists = True

    # -- reading ------------------------------------------------------------------------------
    def _dirs(self, *parts: str) -> list[str]:
        path = self.fs._strip_protocol(self.uri(*parts)) if parts else self.path
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"]
        return sorted(n for n in names if not n.startswith((".", "_")))

    def current(self) -> dict | None:
        return read_json(self.uri(CURRENT_NAME), self.storage_options) if self.exists else None

    def current_snapshot(self) -> Snapshot | None:
        cur = self.current()
        if not cur:
            return None
        snap = self.snapshot(cur["model_slug"], cur["version"], cur["snapshot"])
        if snap is None:
            raise StoreError(
                f"{self.root}/{CURRENT_NAME} points at {cur.get('path')}, which is not a committed snapshot"
            )
        return snap

    def snapshot(self, slug: str, version: str, snapshot: str) -> Snapshot | None:
        manifest = read_json(self.uri(slug, version, snapshot, MANIFEST_NAME), self.storage_options)
        if not manifest or manifest.get("status") != "complete":
            return None
        return Snapshot(slug, version, snapshot, manifest)

    def snapshots(self, slug: str, version: str) -> list[Snapshot]:
        """Committed snapshots of a version, oldest first; half-written ones are skipped."""
        out = []
        for name in self._dirs(slug, version):
            snap = self.snapshot(slug, version, name)
            if snap is not None:
                out.append(snap)
        return out

    def latest(self, slug: str, version: str) -> Snapshot | None:
        snaps = self.snapshots(slug, version)
        return snaps[-1] if snaps else None

    def version_info(self, slug: str, version: str) -> dict | None:
        return read_json(self.uri(slug, version, VERSION_INFO), self.storage_options)

    def versions(self) -> list[dict]:
        """Every version with a committed snapshot: counts and dates of its latest snapshot."""
        if not self.exists:
            return []
        cur = self.current() or {}
        # Each candidate version's latest gate decision (decisions are named by time, so the last wins).
        decisions = {d["candidate"]["version"]: d for d in self.decisions()}
        out = []
        for slug in self._dirs():
            for version in self._dirs(slug):
                snaps = self.snapshots(slug, version)
                if not snaps:
                    continue
                last = snaps[-1]
                info = self.version_info(slug, version) or {}
                evaluation = self.latest_evaluation(last)
                counts = last.manifest.get("counts", {})
                out.append(
                    {
                        "version": f"{slug}/{version}",
                        "model": info.get("settings", {}).get("model"),
                        "revision": info.get("settings", {}).get("revision"),
                        "dim": info.get("settings", {}).get("dim"),
                        "snapshots": len(snaps),
                        "latest_snapshot": last.snapshot,
                        "records": counts.get("written", 0),
                        "errors": counts.get("errors", 0),
                        "created_at": info.get("created_at"),
                        "updated_at": last.manifest.get("finished_at"),
                        "current": cur.get("model_slug") == slug and cur.get("version") == version,
                        "current_snapshot": cur.get("snapshot")
                        if cur.get("model_slug") == slug and cur.get("version") == version
                        else None,
                        "evaluation": evaluation and {
                            "evaluated_at": evaluation.get("evaluated_at"),
                            "queries": evaluation.get("queries", {}).get("scored"),
                            "qrels": evaluation.get("qrels", {}).get("uri"),
                            "metrics": evaluation.get("metrics", {}),
                        },
                        "decision": decisions.get(f"{slug}/{version}"),
                    }
                )
        return out

    def _records(self, *parts: str) -> list[dict]:
        """The JSON records in a folder of the store, by name; a missing folder holds none."""
        folder = self.fs._strip_protocol(self.uri(*parts))
        try:
            names = sorted(n for n in self.fs.ls(folder, detail=False) if n.endswith(".json") and "/.tmp-" not in n)
        except FileNotFoundError:
            return []
        return [r for r in (read_json(unstrip(self.fs, n), self.storage_options) for n in names) if r]

    def latest_evaluation(self, snap: Snapshot) -> dict | None:
        """The most recent `_eval/` record of a snapshot, or None."""
        records = self._records(snap.slug, snap.version, snap.snapshot, EVAL_DIR)
        return max(records, key=lambda r: r.get("evaluated_at") or "", default=None)

    def record_decision(self, decision: dict) -> str:
        """Keep a gate's decision (append-only: one file per decision); its URI."""
        name = f"{new_snapshot_id()}-{decision['candidate']['version'].replace('/', '--')}.json"
        self._write_json(decision, DECISIONS_DIR, name)
        return self.uri(DECISIONS_DIR, name)

    def decisions(self) -> list[dict]:
        """Every recorded gate decision, oldest first (their names start with the time)."""
        return self._records(DECISIONS_DIR)

    def resolve(self, ref: str) -> tuple[str, str]:
        """`slug/version` or a bare version id (when only one model has it) -> (slug, version)."""
        ref = ref.strip("/")
        known = [v["version"] for v in self.versions()]
        if "/" in ref:
            if ref in known:
                slug, version = ref.split("/", 1)
                return slug, version
        else:
            hits = [k for k in known if k.split("/", 1)[1] == ref]
            if len(hits) == 1:
                slug, version = hits[0].split("/", 1)
                return slug, version
            if len(hits) > 1:
                raise StoreError(f"version {ref!r} exists for several models; name one of: {', '.join(hits)}")
        listing = ", ".join(known) or "none"
        raise StoreError(f"no committed version {ref!r} in store {self.root}. Versions: {listing}")

    # -- writing ------------------------------------------------------------------------------
    def write_version_info(self, slug: str, version: str, settings: dict) -> None:
        if self.version_info(slug, version) is None:
            self._write_json({"settings": settings, "created_at": now_iso()}, slug, version, VERSION_INFO)

    def set_current(self, snap: Snapshot) -> dict:
        """Point CURRENT at a committed snapshot, in one atomic write."""
        if self.snapshot(snap.slug, snap.version, snap.snapshot) is None:
            raise StoreError(f"{snap.path} is not a committed snapshot; CURRENT left as it was")
        pointer = {
            "model_slug": snap.slug,
            "version": snap.version,
            "snapshot": snap.snapshot,
            "path": snap.path,
            "activated_at": now_iso(),
        }
        self._write_json(pointer, CURRENT_NAME)
        return pointer


def open_current(root: str, storage_options: dict | None = None) -> str:
    """The directory of the snapshot CURRENT points at: what a reader should load."""
    store = Store(root, storage_options)
    snap = store.current_snapshot()
    if snap is None:
        raise StoreError(f"store {root} has no current version yet")
    return store.uri(snap.slug, snap.version, snap.snapshot)
