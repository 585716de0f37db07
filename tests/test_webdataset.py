"""WebDataset tar shards as img2dataset writes them: records grouped by key, ids `<shard>/<key>`,
bytes streamed and decoded by the CPU pool, a truncated shard's records kept with one error row,
brace ranges, globs and S3. Every record is checked against SentenceTransformer.encode."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmembed.testing.shards import tar_shard as shard
from tests.conftest import run_job
from tests.helpers import decoded, image_bytes, read_output
from tests.s3_fixtures import moto_server, s3, s3fs_for  # noqa: F401 - fixtures


def img2dataset_records(start: int, n: int) -> list[tuple[str, dict[str, bytes]]]:
    return [(f"{i:09d}", {"jpg": image_bytes(i, fmt="JPEG", size=(40 + 4 * (i % 5), 36)),
                          "txt": f"caption number {i}".encode(),
                          "json": json.dumps({"key": f"{i:09d}", "status": "success"}).encode()})
            for i in range(start, start + n)]


@pytest.fixture(scope="module")
def st_clip(tiny_clip):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(tiny_clip, device="cpu")


def embed(argv, executor="local") -> int:
    return run_job("pipelines.embed", [*argv, "--executor", executor])


def test_img2dataset_shards_images_only_equal_st(tmp_path, tiny_clip, st_clip):
    data = tmp_path / "shards"
    data.mkdir()
    recs = {0: img2dataset_records(0, 6), 1: img2dataset_records(6, 5)}
    for k, r in recs.items():
        (data / f"{k:05d}.tar").write_bytes(shard(r))
    out = tmp_path / "out"
    assert embed(["--input", data, "--output", out, "--model", tiny_clip, "--modalities", "image"]) == 0
    emb, errors, manifest = read_output(out)
    want_ids = [f"{k:05d}.tar/{key}" for k, r in recs.items() for key, _ in r]
    assert sorted(emb) == sorted(want_ids) and not errors
    images = [m["jpg"] for r in recs.values() for _, m in r]
    want = st_clip.encode([decoded(b) for b in images])
    assert np.max(np.abs(np.stack([emb[i] for i in want_ids]) - want)) < 1e-5
    c = manifest["counts"]
    assert (c["records"], c["written"], c["errors"], c["unaccounted"]) == (11, 11, 0, None)
    assert manifest["input"]["kind"] == "webdataset" and manifest["input"]["shards"] == 2
    assert c["by_modality"] == {"image": 11}


def test_captions_and_photos_need_a_choice_then_split(tmp_path, tiny_clip, st_clip, capsys):
    (tmp_path / "s").mkdir()
    recs = img2dataset_records(0, 3)
    (tmp_path / "s" / "000.tar").write_bytes(shard(recs))
    out = tmp_path / "out"
    # CLIP cannot embed a photo and its caption as one input: refused before anything runs.
    assert embed(["--input", tmp_path / "s", "--output", out, "--model", tiny_clip]) == 2
    assert "image+text" in capsys.readouterr().err and not out.exists()
    assert embed(["--input", tmp_path / "s", "--output", out, "--model", tiny_clip, "--split-modalities"]) == 0
    emb, errors, _ = read_output(out)
    assert not errors and len(emb) == 6
    texts = st_clip.encode([m["txt"].decode() for _, m in recs])
    images = st_clip.encode([decoded(m["jpg"]) for _, m in recs])
    got_t = np.stack([emb[f"000.tar/{k}#text"] for k, _ in recs])
    got_i = np.stack([emb[f"000.tar/{k}#image"] for k, _ in recs])
    assert np.max(np.abs(got_t - texts)) < 1e-5 and np.max(np.abs(got_i - images)) < 1e-5


def test_a_truncated_shard_keeps_its_records_before_the_fault(tmp_path, tiny_clip, st_clip):
    (tmp_path / "s").mkdir()
    good = img2dataset_records(0, 4)
    bad = img2dataset_records(4, 6)
    (tmp_path / "s" / "a.tar").write_bytes(shard(good))
    whole = shard(bad)
    # Cut inside the 4th record's jpg (its 512-byte header starts with its name): three whole records
    # come before the fault.
    cut = whole.find(f"{bad[3][0]}.jpg".encode()) + 512 + 100
    (tmp_path / "s" / "b.tar").write_bytes(whole[:cut])
    (tmp_path / "s" / "c.tar").write_bytes(b"this is not a tar archive at all" * 40)
    out = tmp_path / "out"
    rc = embed(["--input", tmp_path / "s", "--output", out, "--model", tiny_clip, "--modalities", "image"])
    assert rc == 0
    emb, errors, manifest = read_output(out)
    kept = [f"a.tar/{k}" for k, _ in good] + [f"b.tar/{k}" for k, _ in bad[:3]]
    assert sorted(emb) == sorted(kept)
    assert sorted(errors) == ["b.tar", "c.tar"]
    assert "truncated or corrupt at byte offset" in errors["b.tar"]["error"]
    assert "after 3 records" in errors["b.tar"]["error"] and f"b.tar/{bad[3][0]}" in errors["b.tar"]["error"]
    want = st_clip.encode([decoded(m["jpg"]) for _, m in good + bad[:3]])
    assert np.max(np.abs(np.stack([emb[i] for i in kept]) - want)) < 1e-5
    assert manifest["counts"]["records"] == len(kept) + 2


def test_brace_ranges_and_globs(tmp_path, tiny_clip):
    (tmp_path / "s").mkdir()
    for k in range(3):
        (tmp_path / "s" / f"shard-{k:06d}.tar").write_bytes(shard(img2dataset_records(10 * k, 2)))
    for pattern, shards in ((f"{tmp_path}/s/shard-{{000000..000001}}.tar", 2), (f"{tmp_path}/s/*.tar", 3)):
        out = tmp_path / f"out{shards}"
        assert embed(["--input", pattern, "--output", out, "--model", tiny_clip, "--modalities", "image"]) == 0
        emb, errors, manifest = read_output(out)
        assert len(emb) == 2 * shards and not errors and manifest["input"]["shards"] == shards
    assert embed(["--input", f"{tmp_path}/s/shard-{{000000..000005}}.tar", "--output", tmp_path / "o", "--model",
                  tiny_clip]) == 2


def test_a_rerun_is_a_no_op_and_a_changed_shard_is_another_input(tmp_path, tiny_clip, capsys):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "a.tar").write_bytes(shard(img2dataset_records(0, 2)))
    out = tmp_path / "out"
    argv = ["--input", tmp_path / "s", "--output", out, "--model", tiny_clip, "--modalities", "image"]
    assert embed(argv) == 0
    assert embed(argv) == 0 and "nothing to do" in capsys.readouterr().out
    (tmp_path / "s" / "a.tar").write_bytes(shard(img2dataset_records(0, 3)))
    assert embed(argv) == 2 and "input_fingerprint" in capsys.readouterr().err


@pytest.mark.slow
def test_shards_on_s3_on_ray(ray_session, s3, tiny_clip, st_clip):
    server, bucket, opts = s3
    fs = s3fs_for(server)
    recs = {k: img2dataset_records(5 * k, 5) for k in range(2)}
    for k, r in recs.items():
        fs.pipe_file(f"{bucket}/wds/{k:05d}.tar", shard(r))
    out = f"s3://{bucket}/wds-out"
    assert embed(["--input", f"s3://{bucket}/wds/{{00000..00001}}.tar", "--output", out, "--model", tiny_clip,
                  "--modalities", "image", "--storage-options", opts], executor="ray") == 0
    import pyarrow.parquet as pq

    manifest = json.loads(fs.cat_file(f"{bucket}/wds-out/_manifest.json"))
    got = {}
    for f in manifest["files"]:
        t = pq.read_table(fs.open(f"{bucket}/wds-out/{f['name']}"))
        got.update(zip(t.column("id").to_pylist(), t.column("embedding").to_pylist()))
    ids = [f"{k:05d}.tar/{key}" for k, r in recs.items() for key, _ in r]
    assert sorted(got) == sorted(ids) and not manifest["error_files"]
    want = st_clip.encode([decoded(m["jpg"]) for r in recs.values() for _, m in r])
    assert np.max(np.abs(np.asarray([got[i] for i in ids]) - want)) < 1e-5
