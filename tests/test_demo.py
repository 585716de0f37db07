"""`mmembed demo`, the README's first command: it embeds, ranks with the real MiniLM, and says where it ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_demo_ranks_the_sourdough_texts_first_and_says_where_it_ran(tmp_path):
    work = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "mmembed.cli", "demo", "--workdir", str(work), "--photos", "3",
                          "--screenshots", "1"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    # Inputs this small run without Ray; the summary must not claim otherwise.
    assert "in this process, without Ray" in out and "in-process Ray" not in out, out
    for sub in ("text-embeddings", "image-embeddings"):
        manifest = json.loads(Path(work, sub, "_manifest.json").read_text())
        assert manifest["resources"]["executor"] == "local"
    top = [line for line in out.splitlines() if line.strip().startswith("1. ")]
    assert top and "sourdough-" in top[0], out
