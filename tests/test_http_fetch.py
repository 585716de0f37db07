"""Media over HTTP as web servers and CDNs really send them: chunked bodies, short bodies, redirects,
errors, stalls and HTML pages. Each record ends as a vector equal to ST's on the same bytes or as an
error row naming the URL and the cause; every id is accounted for, with both executors."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sentence_transformers import SentenceTransformer

from tests.conftest import run_job
from tests.helpers import image_bytes, max_abs_diff, read_output

LIMIT = 200_000  # --max-bytes of the jobs below
TIMEOUT_S = 1.0  # --http-timeout of the jobs below
PHOTO = image_bytes(1, fmt="JPEG", size=(96, 64))
SHOT = image_bytes(2, fmt="PNG", size=(80, 60))
HUGE = b"\xff\xd8" + bytes(range(256)) * 4096  # 1 MiB, over LIMIT


class Server:
    """A local HTTP server whose paths each misbehave one way; counts requests by (method, path)."""

    def __init__(self):
        self.requests: list[tuple[str, str]] = []
        self.flaky_seen: set[str] = set()
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                with server.lock:
                    server.requests.append(("HEAD", self.path))
                self.send_response(405)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                with server.lock:
                    server.requests.append(("GET", self.path))
                try:
                    server.answer(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up, as some cases want

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def answer(self, h):
        path, _, query = h.path.partition("?")
        if path == "/photo.jpg":
            return self.body(h, PHOTO, "image/jpeg")
        if path == "/chunked.png":
            return self.chunked(h, SHOT, "image/png")
        if path == "/chunked-huge.jpg":
            return self.chunked(h, HUGE, "image/jpeg")
        if path == "/declared-huge.jpg":
            return self.body(h, HUGE, "image/jpeg")
        if path == "/short.jpg":  # Content-Length promises more than is sent
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.send_header("Content-Length", str(len(PHOTO) + 5000))
            h.end_headers()
            h.wfile.write(PHOTO)
            h.wfile.flush()
            h.close_connection = True
            return None
        if path == "/chunked-cut.png":  # chunked, closed before the last chunk
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            half = SHOT[: len(SHOT) // 2]
            h.wfile.write(f"{len(half):x}\r\n".encode() + half + b"\r\n")
            h.wfile.flush()
            h.close_connection = True
            return None
        if path.startswith("/hop/"):  # /hop/3 -> /hop/2 -> /hop/1 -> /photo.jpg
            n = int(path.rsplit("/", 1)[1])
            return self.redirect(h, f"/hop/{n - 1}" if n > 1 else "/photo.jpg")
        if path.startswith("/far/"):  # /far/12 -> ... -> /far/0 -> /photo.jpg: more hops than a fetch follows
            n = int(path.rsplit("/", 1)[1])
            return self.redirect(h, f"/far/{n - 1}" if n > 0 else "/photo.jpg")
        if path == "/loop-a.jpg":
            return self.redirect(h, "/loop-b.jpg")
        if path == "/loop-b.jpg":
            return self.redirect(h, "/loop-a.jpg")
        if path == "/missing.jpg":
            return self.body(h, b"no such thing", "text/plain", status=404)
        if path == "/broken.jpg":
            return self.body(h, b"internal error", "text/plain", status=500)
        if path == "/flaky.jpg":  # 503 once per query string, then the photo
            with self.lock:
                first = query not in self.flaky_seen
                self.flaky_seen.add(query)
            if first:
                return self.body(h, b"slow down", "text/plain", status=503)
            return self.body(h, PHOTO, "image/jpeg")
        if path == "/stall.jpg":  # headers and half the body, then nothing for longer than the timeout
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.send_header("Content-Length", str(len(PHOTO)))
            h.end_headers()
            h.wfile.write(PHOTO[: len(PHOTO) // 2])
            h.wfile.flush()
            time.sleep(TIMEOUT_S * 3)
            h.close_connection = True
            return None
        if path == "/page.jpg":
            return self.body(h, b"<!doctype html><html><body>Sign in</body></html>", "text/html; charset=utf-8")
        return self.body(h, b"", "text/plain", status=404)

    @staticmethod
    def body(h, data: bytes, kind: str, status: int = 200):
        h.send_response(status)
        h.send_header("Content-Type", kind)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def chunked(h, data: bytes, kind: str, size: int = 4096):
        h.send_response(200)
        h.send_header("Content-Type", kind)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for i in range(0, len(data), size):
            part = data[i : i + size]
            h.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            h.wfile.flush()
        h.wfile.write(b"0\r\n\r\n")

    @staticmethod
    def redirect(h, to: str):
        h.send_response(302)
        h.send_header("Location", to)
        h.send_header("Content-Length", "0")
        h.end_headers()

    @contextlib.contextmanager
    def running(self):
        thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.httpd.shutdown()
            self.httpd.server_close()


# id -> (path, the bytes its vector must match, or the words its error row must hold)
CASES = {
    "plain": ("/photo.jpg", PHOTO),
    "chunked": ("/chunked.png", SHOT),
    "redirect-chain": ("/hop/3", PHOTO),
    "flaky": ("/flaky.jpg?{run}", PHOTO),
    "chunked-over-limit": ("/chunked-huge.jpg", ["200000-byte limit", "--max-bytes"]),
    "declared-over-limit": ("/declared-huge.jpg", ["200000-byte limit", "Content-Length 1,048,578"]),
    "short-body": ("/short.jpg", ["truncated body", f"received {len(PHOTO):,} of {len(PHOTO) + 5000:,} bytes"]),
    "chunked-cut": ("/chunked-cut.png", ["truncated body"]),
    "redirect-loop": ("/loop-a.jpg", ["redirect loop"]),
    "too-many-redirects": ("/far/12", ["too many redirects (more than 10)"]),
    "not-found": ("/missing.jpg", ["not found", "HTTP 404"]),
    "server-error": ("/broken.jpg", ["HTTP 500", "after 5 tries"]),
    "stall": ("/stall.jpg", ["timed out after 5 tries of 1 s"]),
    "html": ("/page.jpg", ["not media", "text/html"]),
}


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_http_media_as_servers_send_them(executor, ray_session, tiny_clip, tmp_path):
    server = Server()
    with server.running():
        urls = {rid: server.base + path.format(run=executor) for rid, (path, _) in CASES.items()}
        manifest = tmp_path / "manifest.parquet"
        pq.write_table(pa.table({"id": list(urls), "image": list(urls.values())}), manifest)
        out = tmp_path / "out"
        rc = run_job("pipelines.embed", ["--input", manifest, "--output", out, "--model", tiny_clip,
                                         "--executor", executor, "--allow-http", "--http-timeout", TIMEOUT_S,
                                         "--max-bytes", LIMIT, "--max-error-fraction", 1.0])
    assert rc == 0
    emb, errors, man = read_output(out)
    assert set(emb) | set(errors) == set(CASES) and not set(emb) & set(errors)  # every id once
    assert man["counts"]["records"] == len(CASES)
    want_vectors = {rid for rid, (_, want) in CASES.items() if isinstance(want, bytes)}
    assert set(emb) == want_vectors, {rid: errors[rid]["error"] for rid in want_vectors - set(emb)}
    for rid, (_, want) in CASES.items():
        if isinstance(want, list):
            text = errors[rid]["error"]
            assert urls[rid] in text, text
            for words in want:
                assert words in text, (rid, text)
    # The vectors equal ST's on the same bytes, read from files as ST reads any image path.
    st = SentenceTransformer(tiny_clip, device="cpu")
    ids = sorted(want_vectors)
    paths = []
    for rid in ids:
        p = tmp_path / f"{rid}.{'png' if CASES[rid][1] is SHOT else 'jpg'}"
        p.write_bytes(CASES[rid][1])
        paths.append(str(p))
    assert max_abs_diff(emb, ids, st.encode(paths, convert_to_numpy=True)) <= 1e-5
    # One request per object: no HEAD, and a good object is fetched once.
    assert not [r for r in server.requests if r[0] == "HEAD"]
    assert sum(1 for m, p in server.requests if p == "/photo.jpg") == 2  # plain, and the chain's end
    assert sum(1 for m, p in server.requests if p == "/chunked.png") == 1
