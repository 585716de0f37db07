"""Versioned store layout, CURRENT pointer, listing, change index and content hashes (no cluster)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mmembed.outputs.ids import IndexRef, KeyIndex
from mmembed.outputs.manifest import MANIFEST_NAME, write_json
from mmembed.stores.changes import CHANGED, NEW, UNCHANGED, classify
from mmembed.stores.store import (
    CURRENT_NAME,
    STORE_MARKER,
    Snapshot,
    Store,
    StoreError,
    model_slug,
    new_snapshot_id,
    version_id,
)

SETTINGS = {
    "model": "org/m",
    "revision": "abc123",
    "task": None,
    "prompt": None,
    "dim": 8,
    "truncate_dim": None,
    "precision": "float32",
    "normalize": True,
    "model_kwargs": {},
    "processor_kwargs": {},
    "transport_dtype": None,
}


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under root with a digest of its bytes: "nothing modified" means this is equal."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def fake_snapshot(store: Store, slug: str, version: str, *, records: int, complete: bool = True) -> Snapshot:
    """A snapshot directory as a run leaves it: committed (manifest complete) or half-written."""
    store.ensure_marker()
    store.write_version_info(slug, version, {**SETTINGS, "revision": version.split("-")[0]})
    snap = new_snapshot_id()
    d = Path(store.uri(slug, version, snap))
    d.mkdir(parents=True)
    (d / "part-x.parquet").write_bytes(b"not read here")
    if complete:
        write_json(
            str(d / MANIFEST_NAME),
            {"status": "complete", "counts": {"written": records, "errors": 1}, "finished_at": "2030-01-01T00:00:00"},
        )
    return Snapshot(slug, version, snap)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmembed.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_slug_and_version_are_stable_and_follow_every_setting():
    assert model_slug("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers--all-MiniLM-L6-v2"
    assert model_slug("/models/gt_minilm/model/") == "gt_minilm--model"
    v = version_id(SETTINGS)
    assert v == version_id(dict(reversed(list(SETTINGS.items())))), "key order must not matter"
    assert v.startswith("abc123-")
    changed = {
        "revision": "def456",
        "task": "query",
        "prompt": "query: ",
        "dim": 4,
        "truncate_dim": 4,
        "precision": "float16",
        "normalize": False,
        "model_kwargs": {"dtype": "bfloat16"},
        "processor_kwargs": {"max_pixels": 1000},
        "transport_dtype": "float16",
    }
    ids = {v}
    for key, value in changed.items():
        ids.add(version_id({**SETTINGS, key: value}))
    assert len(ids) == len(changed) + 1, "every embedding setting must change the version id"


def test_open_refuses_non_stores_and_writes_nothing(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Store(str(tmp_path / "missing"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("a,b\n")
    before = tree_digest(other)
    for create in (False, True):
        with pytest.raises(StoreError, match="not an mmembed embedding store"):
            Store(str(other), create=create)
    assert tree_digest(other) == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        Store(str(tmp_path / "file"), create=True)
    fresh = Store(str(tmp_path / "new"), create=True)
    assert not fresh.exists and not (tmp_path / "new").exists(), "opening must not create anything"
    fresh.ensure_marker()
    assert json.loads((tmp_path / "new" / STORE_MARKER).read_text())["format"] == "mmembed-store"
    assert Store(str(tmp_path / "new")).exists


def test_only_committed_snapshots_count_and_current_moves_atomically(tmp_path):
    store = Store(str(tmp_path / "s"), create=True)
    s1 = fake_snapshot(store, "org--m", "abc123-11111111", records=10)
    half = fake_snapshot(store, "org--m", "abc123-11111111", records=99, complete=False)
    assert [s.snapshot for s in store.snapshots("org--m", "abc123-11111111")] == [s1.snapshot]
    assert store.latest("org--m", "abc123-11111111").snapshot == s1.snapshot
    with pytest.raises(StoreError, match="not a committed snapshot"):
        store.set_current(half)
    assert store.current() is None
    store.set_current(s1)
    assert store.current()["path"] == s1.path
    s2 = fake_snapshot(store, "org--m", "abc123-11111111", records=12)
    other = fake_snapshot(store, "org--n", "def456-22222222", records=5)
    listing = {v["version"]: v for v in store.versions()}
    assert set(listing) == {"org--m/abc123-11111111", "org--n/def456-22222222"}
    mine = listing["org--m/abc123-11111111"]
    assert (mine["records"], mine["errors"], mine["snapshots"], mine["current"]) == (12, 1, 2, True)
    assert mine["latest_snapshot"] == s2.snapshot and mine["current_snapshot"] == s1.snapshot
    assert not listing["org--n/def456-22222222"]["current"]
    assert store.resolve("def456-22222222") == ("org--n", "def456-22222222")
    assert store.resolve("org--m/abc123-11111111") == ("org--m", "abc123-11111111")
    with pytest.raises(StoreError, match="no committed version"):
        store.resolve("nope-00000000")
    assert other.path in {f"{v['version']}/{v['latest_snapshot']}" for v in store.versions()}


def test_versions_and_activate_commands(tmp_path):
    root = tmp_path / "s"
    store = Store(str(root), create=True)
    a = fake_snapshot(store, "org--m", "abc123-11111111", records=10)
    b = fake_snapshot(store, "org--n", "def456-22222222", records=7)
    store.set_current(a)

    out = run_cli("versions", str(root), "--json")
    assert out.returncode == 0, out.stderr
    listing = json.loads(out.stdout)
    assert listing["current"]["path"] == a.path
    assert {v["version"]: v["current"] for v in listing["versions"]} == {
        "org--m/abc123-11111111": True,
        "org--n/def456-22222222": False,
    }
    text = run_cli("versions", str(root))
    assert text.returncode == 0 and "* org--m/abc123-11111111" in text.stdout

    # Bad input: a missing version or snapshot, or a root that is not a store; nothing changes.
    before = tree_digest(root)
    missing = run_cli("activate", str(root), "org--n/zzz-00000000")
    assert missing.returncode == 2 and "no committed version" in missing.stderr
    bad_snap = run_cli("activate", str(root), "org--n/def456-22222222", "--snapshot", "nope")
    assert bad_snap.returncode == 2 and "no committed snapshot" in bad_snap.stderr
    not_store = tmp_path / "plain"
    not_store.mkdir()
    (not_store / "x.txt").write_text("x")
    for cmd in (("versions", str(not_store)), ("activate", str(not_store), "org--n/def456-22222222")):
        r = run_cli(*cmd)
        assert r.returncode == 2 and "not an mmembed embedding store" in r.stderr, r.stderr
    assert tree_digest(root) == before
    assert (not_store / "x.txt").read_text() == "x" and len(list(not_store.iterdir())) == 1

    ok = run_cli("activate", str(root), "def456-22222222")
    assert ok.returncode == 0, ok.stderr
    assert json.loads((root / CURRENT_NAME).read_text())["path"] == b.path
    back = run_cli("activate", str(root), "org--m/abc123-11111111", "--snapshot", a.snapshot)
    assert back.returncode == 0 and json.loads((root / CURRENT_NAME).read_text())["path"] == a.path


def test_key_index_lookup_is_exact_even_when_high_words_collide(monkeypatch):
    import mmembed.stores.changes as ch

    ids = [f"id-{i}" for i in range(50)]
    hashes = [f"{i:032x}" if i % 7 else None for i in range(50)]
    index = KeyIndex.build(pa.array(ids), pa.array(hashes, pa.string()))
    found, hi, lo, ok = index.lookup(pa.array(ids + ["absent", "id-"]))
    assert found.tolist() == [True] * 50 + [False, False]
    assert ok.tolist() == [h is not None for h in hashes] + [False, False]
    assert [int(lo[i]) for i in range(50) if ok[i]] == [i for i in range(50) if i % 7]
    # Give every id the same high key word: the low words alone must still tell them apart.
    real = ch.id_keys
    monkeypatch.setattr(ch, "id_keys", lambda values: (np.zeros(len(values), np.uint64), real(values)[1]))
    collided = KeyIndex.build(pa.array(ids), pa.array(hashes, pa.string()))
    found, _, lo, ok = collided.lookup(ids[::-1] + ["absent"])
    assert found.tolist() == [True] * 50 + [False]
    assert [int(lo[i]) for i in range(50) if ok[i]] == [i for i in reversed(range(50)) if i % 7]


def test_classify_against_a_base(ray_session):
    base = KeyIndex.build(
        pa.array(["same", "edited", "failed", "gone"]), pa.array(["a" * 32, "b" * 32, None, "d" * 32], pa.string())
    )
    ref = IndexRef(ray_session.put(base))
    batch = pa.table(
        {
            "id": ["same", "edited", "failed", "fresh", "unfetchable"],
            "content_hash": ["a" * 32, "c" * 32, "e" * 32, "f" * 32, None],
        }
    )
    out = classify(batch, ref)
    assert out.column("status").to_pylist() == [UNCHANGED, CHANGED, CHANGED, NEW, NEW]
    assert classify(batch, None).column("status").to_pylist() == [NEW] * 5


def test_content_hash_covers_text_and_media_bytes_not_their_location(tmp_path):
    from mmembed.inputs.discover import RECORD_SCHEMA
    from mmembed.stages.content_hash import ContentHashStage
    from tests.helpers import image_bytes

    img, other = image_bytes(1), image_bytes(2)
    (tmp_path / "a.png").write_bytes(img)
    (tmp_path / "b.png").write_bytes(img)
    (tmp_path / "t.txt").write_text("hello")

    def row(**cells):
        return {f.name: cells.get(f.name) for f in RECORD_SCHEMA}

    rows = [
        row(id="inline", image_bytes=img),
        row(id="uri-a", image_uri=str(tmp_path / "a.png")),
        row(id="uri-b", image_uri=str(tmp_path / "b.png")),
        row(id="other", image_bytes=other),
        row(id="text", text="hello"),
        row(id="text-file", text_uri=str(tmp_path / "t.txt")),
        row(id="text+image", text="hello", image_bytes=img),
        row(id="missing", image_uri=str(tmp_path / "nope.png")),
        row(id="text2", text="hello!"),
    ]
    out = ContentHashStage()(pa.Table.from_pylist(rows, schema=RECORD_SCHEMA))
    h = dict(zip(out.column("id").to_pylist(), out.column("content_hash").to_pylist()))
    assert h["inline"] == h["uri-a"] == h["uri-b"], "the same bytes hash the same wherever they live"
    assert h["text"] == h["text-file"]
    assert len({h["inline"], h["other"], h["text"], h["text+image"], h["text2"]}) == 5
    assert h["missing"] is None, "an unfetchable record has no hash, so it is always re-embedded"
    assert all(len(v) == 32 for k, v in h.items() if k != "missing")
