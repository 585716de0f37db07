"""Outputs own only what they wrote: what --output may be, what --overwrite removes, inputs kept apart,
names that DuckDB/Polars globs read safely, and the exits a user sees when nothing could be embedded."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_job
from tests.helpers import image_bytes, read_output
from tests.s3_fixtures import moto_server, s3, s3fs_for  # noqa: F401 - fixtures


def _manifest(path, n=4, broken=0):
    imgs = [image_bytes(i) for i in range(n)] + [b"not an image"] * broken
    ids = [f"i{i}" for i in range(n + broken)]
    pq.write_table(pa.table({"id": ids, "image": pa.array(imgs, pa.binary())}), path)
    return ids


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _embed(src, out, model, *extra):
    return run_job("pipelines.embed", ["--input", src, "--output", out, "--model", model, "--executor", "local", *extra])


def test_the_issue_s_victim_folder_is_refused_and_left_as_it_was(tiny_clip, tmp_path, capsys):
    victim = tmp_path / "victim"
    (victim / "photos").mkdir(parents=True)
    (victim / "photos" / "IMG_0001.txt").write_text("mine")
    _manifest(victim / "m.parquet")
    before = {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()}
    for extra in ((), ("--overwrite",)):
        assert _embed(victim / "m.parquet", victim, tiny_clip, *extra) == 2
        err = capsys.readouterr().err
        assert "contains --input" in err
        assert {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()} == before


def test_a_folder_of_someone_else_s_files_is_refused_naming_them(tiny_clip, tmp_path, capsys):
    src = tmp_path / "m.parquet"
    _manifest(src)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("notes.txt", "a.csv", "b.csv", "c.csv", "d.csv", "e.csv", "f.csv"):
        (out / name).write_text("x")
    for extra in ((), ("--overwrite",)):
        assert _embed(src, out, tiny_clip, *extra) == 2
        err = capsys.readouterr().err
        assert "holds entries mmembed did not write (a.csv, b.csv, c.csv, d.csv, e.csv and 2 more)" in err
        assert len(list(out.iterdir())) == 7


def test_an_output_inside_the_input_is_refused(tiny_clip, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(image_bytes(1))
    assert _embed(photos, photos / "emb", tiny_clip) == 2
    assert "is inside --input" in capsys.readouterr().err
    assert not (photos / "emb").exists()
    assert _embed(photos, photos, tiny_clip) == 2
    assert f"--output {photos} is --input" in capsys.readouterr().err


def test_overwrite_removes_only_what_mmembed_wrote(tiny_clip, tmp_path):
    src = tmp_path / "m.parquet"
    ids = _manifest(src, broken=1)
    out = tmp_path / "out"
    assert _embed(src, out, tiny_clip) == 0
    first = _tree(out)
    assert "_manifest.json" in first and "_run.json" in first
    assert _embed(src, out, tiny_clip, "--overwrite") == 0
    emb, errors, _ = read_output(out)
    assert set(emb) | set(errors) == set(ids)
    # the first run's shards are gone (new run tokens), nothing else was there to keep
    assert not set(first) & {n for n in _tree(out) if n.endswith(".parquet")}


def test_bare_parquet_files_without_a_record_of_ours_are_not_overwritten(tiny_clip, tmp_path, capsys):
    src = tmp_path / "m.parquet"
    _manifest(src)
    out = tmp_path / "spark_out"
    out.mkdir()
    pq.write_table(pa.table({"x": [1]}), out / "part-00000.parquet")
    assert _embed(src, out, tiny_clip, "--overwrite") == 2
    assert "removes nothing" in capsys.readouterr().err
    assert (out / "part-00000.parquet").exists()


def test_error_shards_and_shards_in_progress_stay_out_of_result_globs(tiny_clip, tmp_path):
    from mmembed.outputs.ownership import tmp_name

    src = tmp_path / "m.parquet"
    _manifest(src, broken=2)
    out = tmp_path / "out"
    assert _embed(src, out, tiny_clip) == 0
    results = list(out.glob("**/part-*.parquet"))
    assert results and all(p.parent == out for p in results)
    assert [p.name.startswith("errors-") for p in (out / "_errors").iterdir()] == [True]
    assert not tmp_name("part-x.parquet", "abcd1234").endswith(".parquet")
    assert tmp_name("part-x.parquet", "abcd1234").startswith(".")


def test_an_output_of_an_earlier_version_resumes(tiny_clip, tmp_path):
    """Error shards were `_errors/part-*.parquet` before: they still count as committed on a resume."""
    src = tmp_path / "m.parquet"
    ids = _manifest(src, n=4, broken=2)
    out = tmp_path / "out"
    assert _embed(src, out, tiny_clip) == 0
    (shard,) = (out / "_errors").iterdir()
    shard.rename(out / "_errors" / shard.name.replace("errors-", "part-", 1))
    (out / "_manifest.json").unlink()  # an unfinished run of that version
    run = json.loads((out / "_run.json").read_text())
    run["status"] = "running"
    (out / "_run.json").write_text(json.dumps(run))
    assert _embed(src, out, tiny_clip) == 0
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["counts"]["resumed_from_committed"] == len(ids)
    assert manifest["counts"]["errors"] == 2 and manifest["counts"]["written"] == 4
    assert manifest["counts"]["unaccounted"] == 0 and manifest["counts"]["duplicate_ids"] == 0


def test_a_job_where_every_record_failed_exits_non_zero_in_one_line(tiny_clip, tmp_path, capsys):
    src = tmp_path / "m.parquet"
    _manifest(src, n=0, broken=4)
    out = tmp_path / "out"
    assert _embed(src, out, tiny_clip, "--max-error-fraction", "1") == 3
    lines = [line for line in capsys.readouterr().err.splitlines() if "every record failed" in line]
    assert lines == [f"mmembed embed: every record failed (4 error rows, no embeddings); see {out}/_errors"]


def test_a_missing_local_model_path_says_so(tmp_path, capsys, monkeypatch):
    src = tmp_path / "m.parquet"
    _manifest(src)
    monkeypatch.chdir(tmp_path)
    assert _embed(src, tmp_path / "out", "./no-such-model") == 2
    err = capsys.readouterr().err
    assert "model path ./no-such-model does not exist" in err and "Repo id" not in err


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        ("pipelines.rerank", ["--candidates", "c.parquet", "--model", "m"]),
        ("pipelines.search", ["--queries", "q", "--corpus-embeddings", "c", "--top-k", "1"]),
        ("pipelines.index", ["--embeddings", "e"]),
        ("pipelines.retrieve_rerank", ["--queries", "q", "--corpus", "c", "--embedder", "e", "--reranker", "r"]),
    ],
)
def test_every_writing_command_refuses_a_foreign_output_before_reading_anything(module, argv, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    assert run_job(module, [*argv, "--output", out, "--overwrite"]) == 2
    assert "holds entries mmembed did not write (thesis.tex)" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "mine"


def test_reembed_refuses_a_store_inside_its_input(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(image_bytes(1))
    assert run_job("pipelines.reembed", ["--input", photos, "--store", photos / "store", "--model", "m"]) == 2
    assert "--store" in capsys.readouterr().err and not (photos / "store").exists()


def test_on_s3_a_foreign_prefix_is_refused_and_overwrite_keeps_foreign_objects(s3, tiny_clip, tmp_path, capsys):
    server, bucket, opts = s3
    fs = s3fs_for(server)
    src = tmp_path / "m.parquet"
    _manifest(src)
    out = f"s3://{bucket}/emb"
    fs.pipe_file(f"{bucket}/emb/README.md", b"mine")
    argv = ["--input", src, "--output", out, "--model", tiny_clip, "--storage-options", opts, "--executor", "local"]
    assert run_job("pipelines.embed", [*argv, "--overwrite"]) == 2
    assert "holds entries mmembed did not write (README.md)" in capsys.readouterr().err
    assert fs.cat_file(f"{bucket}/emb/README.md") == b"mine"
    # an output of ours on S3: --overwrite replaces our shards only
    out2 = f"s3://{bucket}/emb2"
    argv2 = ["--input", src, "--output", out2, "--model", tiny_clip, "--storage-options", opts, "--executor", "local"]
    assert run_job("pipelines.embed", argv2) == 0
    first = set(fs.glob(f"{bucket}/emb2/part-*.parquet"))
    assert run_job("pipelines.embed", [*argv2, "--overwrite"]) == 0
    fs.invalidate_cache()
    second = set(fs.glob(f"{bucket}/emb2/part-*.parquet"))
    assert first and second and not first & second
