"""A small HTTP proxy that forwards to an S3 endpoint (moto), logs every request and can inject
transient failures: tests/test_fault_injection.py; benchmarks/feed.py counts requests with it.

Faults are bounded: a seeded fraction of requests, never more than `max_faults` in all, plus any
number queued explicitly with `fail_next`. A fault is a 503 SlowDown, a 500 InternalError, or a
connection dropped before any response. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULT_KINDS = ("503", "500", "drop")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultyProxy:
    def __init__(self, upstream: str, *, fail_fraction: float = 0.0, max_faults: int = 0, seed: int = 0,
                 kinds: tuple[str, ...] = FAULT_KINDS):
        target = urlsplit(upstream)
        assert target.hostname in ("127.0.0.1", "localhost"), "the proxy only forwards to this machine"
        self.upstream = (target.hostname, target.port)
        self.fail_fraction = fail_fraction
        self.max_faults = max_faults
        self.kinds = kinds
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.queued: list[str] = []
        self.requests = 0
        self.faults: Counter = Counter()
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, fault) per request
        self.server: ThreadingHTTPServer | None = None

    # -- control ---------------------------------------------------------------------------------
    def fail_next(self, n: int, kind: str = "503") -> None:
        with self.lock:
            self.queued += [kind] * n

    @property
    def injected(self) -> int:
        return sum(self.faults.values())

    def _decide(self, method: str, path: str) -> str | None:
        with self.lock:
            self.requests += 1
            kind = None
            if self.queued:
                kind = self.queued.pop(0)
            elif self.fail_fraction and sum(self.faults.values()) < self.max_faults and self.rng.random() < self.fail_fraction:
                kind = self.rng.choice(self.kinds)
            if kind:
                self.faults[kind] += 1
            self.log.append((method, path, kind))
            return kind

    # -- server ----------------------------------------------------------------------------------
    def start(self) -> str:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self):
                body = self._body()
                kind = proxy._decide(self.command, self.path)
                if kind == "drop":
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                if kind in ("503", "500"):
                    code, name = ("SlowDown", "Please reduce your request rate.") if kind == "503" else (
                        "InternalError", "We encountered an internal error. Please try again.")
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               f"<Message>{name}</Message></Error>").encode()
                    self.send_response(int(kind))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body or "Content-Length" in self.headers or self.headers.get("Transfer-Encoding"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        # A HEAD answer's Content-Length is the object's size, not this empty body's.
                        if k.lower() not in _HOP_BY_HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                            self.send_header(k, v)
                    if self.command != "HEAD":
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="faulty-proxy", daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def __enter__(self):
        self.endpoint = self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
