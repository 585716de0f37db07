"""notebooks/retrieve_and_rerank.ipynb runs end to end, offline, and shows what it promises."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "retrieve_and_rerank.ipynb"


@pytest.mark.slow
def test_retrieve_and_rerank_notebook_runs_offline(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    # The kernel inherits these: its own small Ray, files under tmp_path, no network.
    monkeypatch.setenv("MMEMBED_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parents[1])}}).execute()

    text = "\n".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    assert "how do I keep my sourdough starter alive?" in text
    assert "retrieved (MiniLM cosine):" in text and "reranked (cross-encoder):" in text
    sourdough = text.split("how do I keep my sourdough starter alive?", 1)[1].split("reranked", 1)[0]
    assert sourdough.count("sourdough-") >= 3
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the score distribution plot is missing"
    assert (tmp_path / "work" / "score_distributions.png").stat().st_size > 0
    for step in ("corpus_embeddings", "candidates", "reranked"):
        assert (tmp_path / "work" / "retrieve-rerank" / step / "_manifest.json").exists()
