"""The quickstart notebook runs offline, top to bottom, against the demo corpus."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    monkeypatch.setenv("MMEMBED_NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The kernel gets its own in-process Ray, as a user's notebook would.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "1. " in outputs and "sourdough" in outputs
    assert (tmp_path / "text-emb" / "_manifest.json").exists()
    assert (tmp_path / "image-emb" / "_manifest.json").exists()
