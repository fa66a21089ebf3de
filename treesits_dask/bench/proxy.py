"""A small threaded HTTP proxy in front of an S3 endpoint that injects faults on a fixed schedule.

Clients (s3fs/botocore, GDAL's /vsis3/) talk to the proxy as if it were the S3 endpoint
(path-style, plain HTTP); the proxy forwards each request to the upstream server (moto) and, on a
deterministic schedule, answers instead with

* ``500``: HTTP 500 with an S3 ``InternalError`` XML body (request not forwarded),
* ``503``: HTTP 503 with an S3 ``SlowDown`` XML body (request not forwarded),
* ``drop``: a dropped connection (TCP reset).  Requests other than GET are reset before they are
  forwarded, so a write either happened completely (and its answer arrived) or not at all; GETs
  are reset either before the answer or after the headers and half of the body (``drop_style``
  ``"before"``, ``"mid"`` or ``"alternate"``, the default),
* ``slow``: the real answer, after ``slow_seconds`` and with the body trickled in pieces.

The schedule: every ``every``-th request (counting only requests that were never faulted before,
keyed by method, path, query and range) gets the next fault kind of ``kinds`` in turn.  A retried
request is therefore never faulted twice, so one retry always suffices.  ``counts`` holds what was
injected per kind; ``requests`` / ``by_method`` / ``bytes_down`` what went through.

Also useful without faults: ``latency`` adds a fixed delay to every request (a WAN-like round trip)
to measure how many requests a reader makes.
"""

from __future__ import annotations

import collections
import http.client
import http.server
import socket
import socketserver
import struct
import threading
import time
import uuid
from urllib.parse import urlparse

__all__ = ["FaultProxy", "FAULT_KINDS"]

FAULT_KINDS = ("500", "503", "drop", "slow")

_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
    "<Resource>{resource}</Resource><RequestId>{rid}</RequestId></Error>"
)
_ERRORS = {
    "500": (
        500,
        "Internal Server Error",
        "InternalError",
        "We encountered an internal error. Please try again.",
    ),
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}
# hop-by-hop headers are not forwarded
_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
}


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: FaultProxy

    def handle_error(self, request, client_address):  # resets and client hang-ups are expected
        pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body go out in separate writes: with Nagle's algorithm on, curl (GDAL) would wait
    # for a delayed ACK (~40 ms) on every request, which no real S3 endpoint makes it do
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, fmt, *args):  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(parts)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        proxy = self.server.proxy
        body = self._body()
        kind = proxy._next_fault(self.command, self.path, self.headers.get("Range", ""))
        if kind in _ERRORS:
            self._send_error(kind)
            return
        if kind == "drop" and (self.command != "GET" or not proxy._drop_mid_body()):
            self._reset()
            return
        status, reason, headers, data = proxy._forward(self.command, self.path, self.headers, body)
        if kind == "slow":
            time.sleep(proxy.slow_seconds)
        self.send_response_only(status, reason)
        for k, v in headers:
            if k.lower() not in _HOP and k.lower() != "content-length":
                self.send_header(k, v)
        if self.command == "HEAD":  # the object's size, no body
            length = next((v for k, v in headers if k.lower() == "content-length"), "0")
            self.send_header("Content-Length", length)
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if kind == "drop":  # half of the body, then a reset
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._reset()
            return
        if kind == "slow" and data:
            step = max(1, len(data) // 4)
            for i in range(0, len(data), step):
                self.wfile.write(data[i : i + step])
                self.wfile.flush()
                time.sleep(proxy.slow_seconds / 4)
        else:
            self.wfile.write(data)
        proxy._add_bytes(len(data))

    def _send_error(self, kind: str) -> None:
        status, reason, code, message = _ERRORS[kind]
        body = _ERROR_BODY.format(
            code=code,
            message=message,
            resource=self.path.split("?")[0],
            rid=uuid.uuid4().hex[:16].upper(),
        ).encode()
        self.send_response_only(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", uuid.uuid4().hex[:16].upper())
        if kind == "503":
            self.send_header("Retry-After", "0")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        """Close the client connection with a TCP reset (no FIN, no answer)."""
        try:
            self.wfile.flush()
        except OSError:
            pass
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        self.connection.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass


class FaultProxy:
    """``with FaultProxy("http://127.0.0.1:5000", every=5) as proxy: proxy.url ...``.

    ``every=0`` disables faults (a counting, optionally slowed-down proxy).  Change ``every`` /
    ``kinds`` at any time (e.g. ``proxy.every = 0`` while a test sets up its buckets).
    """

    def __init__(
        self,
        upstream: str,
        every: int = 0,
        kinds=FAULT_KINDS,
        slow_seconds: float = 0.4,
        latency: float = 0.0,
        drop_style: str = "alternate",
    ):
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.every = every
        self.kinds = tuple(kinds)
        self.slow_seconds = slow_seconds
        self.latency = latency
        self.drop_style = drop_style  # GETs: "mid" (after half the body), "before", or "alternate"
        self._drops = 0
        self.counts: collections.Counter = collections.Counter()
        self.by_method: collections.Counter = collections.Counter()
        self.requests = 0
        self.bytes_down = 0
        self.faulted: list[tuple[str, str, str]] = []  # (kind, method, path)
        self._seen: set[tuple[str, str, str]] = set()
        self._eligible = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- life cycle ---------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, daemon=True, name="faultproxy"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self.by_method.clear()
            self.requests = 0
            self.bytes_down = 0
            self.faulted.clear()

    # ---- used by the handler ------------------------------------------------------------------
    def _next_fault(self, method: str, path: str, rng: str) -> str | None:
        with self._lock:
            self.requests += 1
            self.by_method[method] += 1
            if not self.every or not self.kinds:
                return None
            key = (method, path, rng)
            if key in self._seen:
                return None  # a retry of a faulted request (or a repeat): let it through
            self._eligible += 1
            if self._eligible % self.every:
                return None
            kind = self.kinds[(self._eligible // self.every - 1) % len(self.kinds)]
            self._seen.add(key)
            self.counts[kind] += 1
            self.faulted.append((kind, method, path))
            return kind

    def _drop_mid_body(self) -> bool:
        with self._lock:
            self._drops += 1
            if self.drop_style == "alternate":
                return self._drops % 2 == 1
            return self.drop_style == "mid"

    def _add_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes_down += n

    def _forward(self, method: str, path: str, headers, body: bytes):
        if self.latency:
            time.sleep(self.latency)
        out = {k: v for k, v in headers.items() if k.lower() not in _HOP}
        if body or method in ("PUT", "POST"):
            out["Content-Length"] = str(len(body))
        for attempt in range(2):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(*self.upstream, timeout=120)
            try:
                conn.request(method, path, body=body or None, headers=out)
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, resp.reason, resp.getheaders(), data
            except (http.client.HTTPException, OSError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")
