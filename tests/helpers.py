"""Small shared helpers for tests: generated media and reading job outputs."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np


def make_image(seed: int, size=(64, 48)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


def image_bytes(seed: int, fmt: str = "PNG", size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    make_image(seed, size).save(buf, format=fmt)
    return buf.getvalue()


def decoded(data: bytes):
    """What the preprocess stage hands ST for image bytes."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB") if img.mode != "RGB" else img


def read_output(out: Path | str) -> tuple[dict[str, np.ndarray], dict[str, dict], dict]:
    """(embedding by id, error row by id, manifest) of a finished embed job."""
    import pyarrow.parquet as pq

    out = Path(out)
    parts = sorted(out.glob("part-*.parquet"))
    emb: dict[str, np.ndarray] = {}
    ids_seen: list[str] = []
    for p in parts:
        t = pq.read_table(p)
        vecs = np.asarray(t.column("embedding").combine_chunks().flatten()).reshape(t.num_rows, -1)
        for i, rid in enumerate(t.column("id").to_pylist()):
            ids_seen.append(rid)
            emb[rid] = vecs[i]
    assert len(ids_seen) == len(emb), "duplicate ids in output shards"
    errors: dict[str, dict] = {}
    err_ids: list[str] = []
    for p in sorted((out / "_errors").glob("errors-*.parquet")):
        for row in pq.read_table(p).to_pylist():
            err_ids.append(row["id"])
            errors[row["id"]] = row
    assert len(err_ids) == len(errors), "duplicate ids in error shards"
    manifest = json.loads((out / "_manifest.json").read_text())
    return emb, errors, manifest


def max_abs_diff(ours: dict[str, np.ndarray], ids: list[str], reference: np.ndarray) -> float:
    mine = np.stack([ours[i] for i in ids]).astype(np.float32)
    return float(np.max(np.abs(mine - reference.astype(np.float32))))


SLOW_DELAY_S = 3.0


@contextlib.contextmanager
def media_server(payloads: dict[str, bytes]):
    """A local HTTP server for {path: bytes}; paths starting with /slow answer after SLOW_DELAY_S. Yields its base URL."""
    import http.server
    import threading
    import time

    class Media(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path.startswith("/slow"):
                time.sleep(SLOW_DELAY_S)
            data = payloads.get(self.path, b"")
            self.send_response(200 if self.path in payloads else 404)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command == "GET":
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up at its timeout, as the tests want

        do_HEAD = do_GET

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Media)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
