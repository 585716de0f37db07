"""Corpora as they arrive: manifests whose columns have other names (img2dataset), Hugging Face
datasets Parquet with Image structs, --modalities, on a local disk and on S3. Every record is
checked against SentenceTransformer.encode on the same images, and every id is accounted for."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_job
from tests.s3_fixtures import moto_server, s3, s3fs_for  # noqa: F401 - fixtures
from tests.helpers import decoded, image_bytes, read_output

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.fixture(scope="module")
def st_clip(tiny_clip):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(tiny_clip, device="cpu")


def embed(argv) -> int:
    return run_job("pipelines.embed", [*argv, "--executor", "local"])


def test_img2dataset_columns_and_only_the_images(tmp_path, tiny_clip, st_clip):
    """An img2dataset Parquet shard (key, jpg, txt, url...): the photos embedded, the captions left alone."""
    jpgs = [image_bytes(i, fmt="JPEG", size=(48 + 8 * i, 40)) for i in range(5)]
    keys = [f"{i:09d}" for i in range(5)]
    table = pa.table({
        "key": keys,
        "url": [f"https://example.com/{k}.jpg" for k in keys],
        "txt": [f"caption {i}" for i in range(5)],
        "jpg": pa.array(jpgs, pa.binary()),
        "width": [48 + 8 * i for i in range(5)],
        "status": ["success"] * 5,
    })
    pq.write_table(table, tmp_path / "00000.parquet")
    out = tmp_path / "out"
    assert embed(["--input", tmp_path / "00000.parquet", "--output", out, "--model", tiny_clip, "--id-column", "key",
                  "--image-column", "jpg", "--text-column", "txt", "--modalities", "image"]) == 0
    emb, errors, manifest = read_output(out)
    assert sorted(emb) == keys and not errors
    want = st_clip.encode([decoded(b) for b in jpgs])
    got = np.stack([emb[k] for k in keys])
    assert np.max(np.abs(got - want)) < 1e-5
    assert manifest["counts"]["by_modality"] == {"image": 5}
    assert manifest["input"]["columns"] == {"id": "key", "text": "txt", "image": "jpg", "audio": "audio",
                                            "video": "video"}
    assert manifest["input"]["modalities"] == ["image"]


def test_text_only_of_an_img2dataset_shard_equals_st(tmp_path, minilm_path):
    from sentence_transformers import SentenceTransformer

    texts = ["sourdough starter feeding", "a comet over the desert", "fixing a bicycle chain"]
    pq.write_table(pa.table({"key": ["a", "b", "c"], "txt": texts, "jpg": pa.array([b"x"] * 3, pa.binary())}),
                   tmp_path / "s.parquet")
    out = tmp_path / "out"
    assert embed(["--input", tmp_path / "s.parquet", "--output", out, "--model", minilm_path, "--id-column", "key",
                  "--text-column", "txt", "--image-column", "jpg", "--modalities", "text"]) == 0
    emb, errors, _ = read_output(out)
    want = SentenceTransformer(minilm_path, device="cpu").encode(texts)
    assert not errors and np.max(np.abs(np.stack([emb[k] for k in "abc"]) - want)) < 1e-5


def test_hugging_face_image_feature(tmp_path, tiny_clip, st_clip):
    """datasets' Image feature, struct<bytes, path>: the bytes win, a path alone is read, neither is an error row."""
    (tmp_path / "imgs").mkdir()
    on_disk = image_bytes(7, size=(60, 44))
    (tmp_path / "imgs" / "seven.png").write_bytes(on_disk)
    cells = [
        {"bytes": image_bytes(1), "path": "ignored/when/bytes/are/there.png"},
        {"bytes": image_bytes(2, fmt="JPEG"), "path": None},
        {"bytes": None, "path": "imgs/seven.png"},  # relative to the manifest, as media paths are
        {"bytes": None, "path": None},
    ]
    table = pa.table({"idx": [0, 1, 2, 3], "image": pa.array(cells, HF_IMAGE), "label": [3, 1, 4, 1]})
    pq.write_table(table, tmp_path / "train-00000-of-00001.parquet")
    out = tmp_path / "out"
    rc = embed(["--input", tmp_path / "train-00000-of-00001.parquet", "--output", out, "--model", tiny_clip,
                "--id-column", "idx"])
    assert rc == 0
    emb, errors, manifest = read_output(out)
    assert sorted(emb) == ["0", "1", "2"] and sorted(errors) == ["3"]
    assert "neither bytes nor a path" in errors["3"]["error"] and "Hugging Face" in errors["3"]["error"]
    want = st_clip.encode([decoded(cells[0]["bytes"]), decoded(cells[1]["bytes"]), str(tmp_path / "imgs/seven.png")])
    assert np.max(np.abs(np.stack([emb[k] for k in "012"]) - want)) < 1e-5
    assert manifest["counts"]["written"] + manifest["counts"]["errors"] == manifest["counts"]["records"] == 4


def test_a_mapped_column_that_is_missing_is_refused_before_anything_runs(tmp_path, tiny_clip, capsys):
    pq.write_table(pa.table({"key": ["a"], "jpg": pa.array([image_bytes(1)], pa.binary())}), tmp_path / "s.parquet")
    out = tmp_path / "out"
    rc = embed(["--input", tmp_path / "s.parquet", "--output", out, "--model", tiny_clip, "--id-column", "key",
                "--image-column", "png"])
    err = capsys.readouterr().err
    assert rc == 2 and "--image-column png" in err and "key, jpg" in err
    assert not out.exists()
    rc = embed(["--input", tmp_path / "s.parquet", "--output", out, "--model", tiny_clip, "--image-column", "jpg"])
    assert rc == 2 and "no `id` column" in capsys.readouterr().err and not out.exists()


def test_other_columns_or_modalities_are_another_run(tmp_path, tiny_clip, capsys):
    """The column mapping is part of the run identity: a rerun with other --modalities is refused, not mixed in."""
    pq.write_table(pa.table({"key": ["a", "b"], "jpg": pa.array([image_bytes(1), image_bytes(2)], pa.binary()),
                             "txt": ["one", "two"]}), tmp_path / "s.parquet")
    out = tmp_path / "out"
    base = ["--input", tmp_path / "s.parquet", "--output", out, "--model", tiny_clip, "--id-column", "key",
            "--image-column", "jpg", "--text-column", "txt"]
    assert embed([*base, "--modalities", "image"]) == 0
    assert embed([*base, "--modalities", "image"]) == 0  # the same run: complete, nothing to do
    assert "nothing to do" in capsys.readouterr().out
    assert embed([*base, "--modalities", "text"]) == 2
    assert "input_columns" in capsys.readouterr().err
    run = json.loads((out / "_run.json").read_text())
    assert run["identity"]["input_columns"]["modalities"] == ["image"]


def test_modalities_skip_other_files_of_a_media_folder(tmp_path, tiny_clip, st_clip):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.png").write_bytes(image_bytes(1))
    (tmp_path / "corpus" / "a.txt").write_text("a caption")
    out = tmp_path / "out"
    assert embed(["--input", tmp_path / "corpus", "--output", out, "--model", tiny_clip, "--modalities", "image"]) == 0
    emb, errors, manifest = read_output(out)
    assert list(emb) == ["a.png"] and not errors and manifest["counts"]["records"] == 1
    assert np.max(np.abs(emb["a.png"] - st_clip.encode([str(tmp_path / "corpus" / "a.png")])[0])) < 1e-5


@pytest.mark.slow
def test_hugging_face_parquet_on_s3(ray_session, s3, tiny_clip, st_clip):
    """The same Image structs read from S3, a path resolved against the manifest's prefix, on the Ray executor."""

    server, bucket, opts = s3
    fs = s3fs_for(server)
    fs.pipe_file(f"{bucket}/hf/imgs/p.png", image_bytes(5))
    cells = [{"bytes": image_bytes(4), "path": None}, {"bytes": None, "path": "imgs/p.png"}, None]
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": ["b", "p", "none"], "image": pa.array(cells, HF_IMAGE)}), buf)
    fs.pipe_file(f"{bucket}/hf/data.parquet", buf.getvalue().to_pybytes())
    out = f"s3://{bucket}/hf-out"
    assert run_job("pipelines.embed", ["--input", f"s3://{bucket}/hf/data.parquet", "--output", out, "--model",
                                       tiny_clip, "--storage-options", opts, "--executor", "ray"]) == 0
    manifest = json.loads(fs.cat_file(f"{bucket}/hf-out/_manifest.json"))
    got = {}
    for f in manifest["files"]:
        t = pq.read_table(fs.open(f"{bucket}/hf-out/{f['name']}"))
        got.update(zip(t.column("id").to_pylist(), t.column("embedding").to_pylist()))
    errors = [r for f in manifest["error_files"] for r in pq.read_table(fs.open(f"{bucket}/hf-out/{f['name']}")).to_pylist()]
    assert sorted(got) == ["b", "p"] and [e["id"] for e in errors] == ["none"]
    want = st_clip.encode([decoded(image_bytes(4)), decoded(image_bytes(5))])
    assert np.max(np.abs(np.asarray([got["b"], got["p"]]) - want)) < 1e-5
