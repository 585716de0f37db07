"""PDFs page by page: one record per page (id `<document>#page=<n>`), each equal to
SentenceTransformer.encode on the same page rendered with pypdfium2; bad documents and oversized
pages as error rows; committed pages never rendered again."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_job
from tests.helpers import make_image, read_output

pdfium = pytest.importorskip("pypdfium2")


def make_pdf(path, pages: int, seed: int = 0, size=(60, 40)) -> bytes:
    """A PDF with one distinct picture per page, written by Pillow (72 dpi: a point per pixel)."""
    images = [make_image(seed + i, size=size) for i in range(pages)]
    buf = io.BytesIO()
    images[0].save(buf, format="PDF", save_all=True, append_images=images[1:], resolution=72.0)
    if path is not None:
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def rendered(data: bytes, scale) -> list:
    """The pages as pypdfium2 renders them, straight from the library: the reference ST embeds."""
    doc = pdfium.PdfDocument(data)
    out = []
    for page in doc:
        s = scale(*page.get_size()) if callable(scale) else scale
        out.append(page.render(scale=s).to_pil().convert("RGB"))
    return out


@pytest.fixture(scope="module")
def st_clip(tiny_clip):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(tiny_clip, device="cpu")


def embed(argv) -> int:
    return run_job("pipelines.embed", [*argv, "--executor", "local"])


def test_pages_of_a_folder_of_pdfs_equal_st(tmp_path, tiny_clip, st_clip):
    docs = tmp_path / "docs"
    docs.mkdir()
    a = make_pdf(docs / "a.pdf", 3, seed=0)
    b = make_pdf(docs / "b.pdf", 2, seed=10, size=(50, 70))
    out = tmp_path / "out"
    assert embed(["--input", docs, "--output", out, "--model", tiny_clip, "--pdf-dpi", "72"]) == 0
    emb, errors, manifest = read_output(out)
    ids = [f"a.pdf#page={n}" for n in (1, 2, 3)] + [f"b.pdf#page={n}" for n in (1, 2)]
    assert sorted(emb) == sorted(ids) and not errors
    want = st_clip.encode(rendered(a, 1.0) + rendered(b, 1.0))
    assert np.max(np.abs(np.stack([emb[i] for i in ids]) - want)) < 1e-5
    c = manifest["counts"]
    assert (c["documents"], c["pages"], c["written"], c["records"], c["unaccounted"]) == (2, 5, 5, 5, None)
    assert c["by_modality"] == {"image": 5}


def test_pages_render_at_the_processors_size(tmp_path, tiny_clip, st_clip):
    """Without --pdf-dpi a page renders with its shorter side at the CLIP processor's shortest_edge."""
    edge = st_clip[0].processor.image_processor.size["shortest_edge"]
    data = make_pdf(tmp_path / "d.pdf", 2, seed=3, size=(90, 60))
    out = tmp_path / "out"
    assert embed(["--input", tmp_path / "d.pdf", "--output", out, "--model", tiny_clip]) == 0
    emb, errors, _ = read_output(out)
    pages = rendered(data, lambda w, h: edge / min(w, h))
    assert [min(p.size) for p in pages] == [edge, edge]
    want = st_clip.encode(pages)
    assert np.max(np.abs(np.stack([emb["d.pdf#page=1"], emb["d.pdf#page=2"]]) - want)) < 1e-5


def test_bad_documents_and_big_pages_are_error_rows(tmp_path, tiny_clip):
    from pypdf import PdfReader, PdfWriter

    docs = tmp_path / "docs"
    docs.mkdir()
    make_pdf(docs / "ok.pdf", 2)
    (docs / "corrupt.pdf").write_bytes(b"%PDF-1.4\n this is not really a pdf at all " * 20)
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf(None, 1))))
    writer.encrypt(user_password="secret", owner_password="owner")
    with open(docs / "locked.pdf", "wb") as f:
        writer.write(f)
    with open(docs / "empty.pdf", "wb") as f:
        PdfWriter().write(f)
    make_pdf(docs / "big.pdf", 1, size=(400, 400))  # 400x400 pages: over --max-image-pixels below
    out = tmp_path / "out"
    rc = embed(["--input", docs, "--output", out, "--model", tiny_clip, "--pdf-dpi", "72",
                "--max-image-pixels", "100000"])
    assert rc == 0
    emb, errors, manifest = read_output(out)
    assert sorted(emb) == ["ok.pdf#page=1", "ok.pdf#page=2"]
    assert sorted(errors) == ["big.pdf#page=1", "corrupt.pdf", "empty.pdf", "locked.pdf"]
    assert "encrypted with a password" in errors["locked.pdf"]["error"]
    assert "corrupt or not a PDF" in errors["corrupt.pdf"]["error"]
    assert "no pages" in errors["empty.pdf"]["error"]
    assert "over --max-image-pixels" in errors["big.pdf#page=1"]["error"]
    assert manifest["counts"]["documents"] == 5 and manifest["counts"]["pages"] == 3


def test_max_pages_max_bytes_and_a_manifest_column(tmp_path, tiny_clip, st_clip):
    long = make_pdf(tmp_path / "long.pdf", 5, seed=20)
    small = make_pdf(None, 1, seed=30)
    pq.write_table(pa.table({"id": ["long", "inline", "huge"], "pdf": ["long.pdf", None, None]}), tmp_path / "m1.parquet")
    # bytes cells: one small, one over --max-bytes
    pq.write_table(pa.table({"id": ["inline", "huge"], "pdf": pa.array([small, b"%PDF" + b"0" * 5000], pa.binary())}),
                   tmp_path / "m2.parquet")
    out = tmp_path / "out"
    assert embed(["--input", tmp_path / "m1.parquet", "--output", out, "--model", tiny_clip, "--pdf-dpi", "72",
                  "--max-pages", "2"]) == 0
    emb, errors, manifest = read_output(out)
    assert sorted(emb) == ["long#page=1", "long#page=2"]
    assert sorted(errors) == ["huge", "inline"]  # rows with no cell at all: empty records
    want = st_clip.encode(rendered(long, 1.0)[:2])
    assert np.max(np.abs(np.stack([emb["long#page=1"], emb["long#page=2"]]) - want)) < 1e-5
    assert manifest["counts"]["documents"] == 1
    out2 = tmp_path / "out2"
    assert embed(["--input", tmp_path / "m2.parquet", "--output", out2, "--model", tiny_clip, "--pdf-dpi", "72",
                  "--max-bytes", "4000"]) == 0
    emb, errors, _ = read_output(out2)
    assert list(emb) == ["inline#page=1"] and list(errors) == ["huge"]
    assert np.max(np.abs(emb["inline#page=1"] - st_clip.encode(rendered(small, 1.0))[0])) < 1e-5


def test_committed_pages_are_never_rendered_again(tiny_clip, monkeypatch):
    """The preprocess stage skips the pages an earlier attempt committed, without rendering them."""
    from mmembed.models.loading import ModelSpec
    from mmembed.outputs.ids import KeyIndex
    from mmembed.stages.preprocess import PreprocessStage
    from mmembed.stages.read import normalize_manifest_table

    data = make_pdf(None, 4)
    committed = KeyIndex.build(pa.array(["doc#page=1", "doc#page=3"]), pa.array(["", ""]))
    renders = []
    real = pdfium.PdfPage.render
    monkeypatch.setattr(pdfium.PdfPage, "render", lambda self, **kw: renders.append(1) or real(self, **kw))
    stage = PreprocessStage(ModelSpec(tiny_clip), pdf_dpi=72, skip=committed, fetch_threads=1)
    batch = normalize_manifest_table(pa.table({"id": ["doc"], "pdf": pa.array([data], pa.binary())}), "")
    pieces = list(stage(batch))
    # A batch of one document leaves in tables of one page: a long PDF never makes one huge block.
    assert [t.num_rows for t in pieces] == [1, 1]
    out = pa.concat_tables(pieces)
    assert out.column("id").to_pylist() == ["doc#page=2", "doc#page=4"] and len(renders) == 2
    assert out.column("error").to_pylist() == [None, None]


@pytest.mark.slow
def test_pdfs_on_ray_resume_without_rendering_committed_pages(ray_session, tmp_path, tiny_clip, st_clip):
    """On the Ray executor: a run whose first attempt committed some pages embeds only the rest."""
    import json

    docs = tmp_path / "docs"
    docs.mkdir()
    a = make_pdf(docs / "a.pdf", 3, seed=40)
    out = tmp_path / "out"
    argv = ["--input", docs, "--output", out, "--model", tiny_clip, "--pdf-dpi", "72", "--executor", "ray"]
    assert run_job("pipelines.embed", argv) == 0
    emb, errors, manifest = read_output(out)
    assert sorted(emb) == [f"a.pdf#page={n}" for n in (1, 2, 3)] and not errors
    want = st_clip.encode(rendered(a, 1.0))
    assert np.max(np.abs(np.stack([emb[f"a.pdf#page={n}"] for n in (1, 2, 3)]) - want)) < 1e-5
    # An interrupted attempt: its manifest never written, one shard of pages committed. The rerun
    # keeps that shard and writes the other pages once.
    (out / "_manifest.json").unlink()
    run = json.loads((out / "_run.json").read_text())
    (out / "_run.json").write_text(json.dumps({**run, "status": "running"}))
    shard = next(out.glob("part-*.parquet"))
    kept = pq.read_table(shard).filter(pa.compute.equal(pa.compute.field("id"), "a.pdf#page=2"))
    pq.write_table(kept, shard)
    assert run_job("pipelines.embed", argv) == 0
    emb, errors, manifest = read_output(out)
    assert sorted(emb) == [f"a.pdf#page={n}" for n in (1, 2, 3)] and not errors
    assert manifest["counts"]["resumed_from_committed"] == 1 and manifest["counts"]["pages"] == 3


def test_reembed_refuses_pdfs_before_anything_is_written(tmp_path, tiny_clip, capsys):
    (tmp_path / "docs").mkdir()
    make_pdf(tmp_path / "docs" / "a.pdf", 1)
    rc = run_job("pipelines.reembed", ["--input", tmp_path / "docs", "--store", tmp_path / "store", "--model", tiny_clip])
    assert rc == 2 and "reembed does not take yet" in capsys.readouterr().err
    assert not any((tmp_path / "store").glob("*/*"))
