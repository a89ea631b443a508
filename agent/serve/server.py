"""HTTP/1.1 transport of the local API: h11 for the protocol, a bounded thread per connection.

h11 (the sans-I/O HTTP/1.1 implementation under uvicorn and httpx) parses and frames every message:
it refuses malformed, negative or conflicting ``Content-Length`` headers and oversized header blocks,
and decodes chunked bodies. This module adds the connection policy a device needs against hostile or
broken clients, each a setting with a default (``ServerSettings``):

- a body limit checked against ``Content-Length`` before reading and against every chunk as it comes;
- a deadline for a whole request (``read_timeout`` from its first byte: slow senders get 408) and an
  idle timeout between requests on a kept-alive connection (``keepalive_timeout``);
- at most ``max_connections`` connections; the ones beyond get a JSON 503 from a few refusal threads
  (and are simply closed if those are busy too); a listen ``backlog`` large enough for bursts.

With an ``ssl.SSLContext`` (``tls_context``) every connection is HTTPS: the handshake runs on the
connection's own thread, bounded by ``read_timeout``, so a client that never finishes it holds one slot
for that long and never blocks the accept loop.

Requests are handled on the connection's own thread (no hand-off between threads: see the comparison
in docs/benchmarks.md), so concurrent requests run in parallel up to the interpreter pool's size.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from time import monotonic
from typing import Callable

import h11

log = logging.getLogger(__name__)
RECV_BYTES = 256 << 10
DRAIN_BYTES = 1 << 20  # read at most this much of an unwanted body before closing


@dataclass(frozen=True)
class ServerSettings:
    max_body_bytes: int = 16 << 20
    max_header_bytes: int = 16 << 10
    max_connections: int = 128
    backlog: int = 1024
    read_timeout: float = 10.0
    keepalive_timeout: float = 5.0


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names; the last value wins
    body: bytes


@dataclass
class Response:
    status: int
    body: list[bytes | memoryview] = field(default_factory=list)
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def error(status: int, message: str, **headers: str) -> Response:
    return Response(status, [json.dumps({"error": message}).encode()],
                    headers=[(k.replace("_", "-"), v) for k, v in headers.items()])


class _Fail(Exception):
    """Answer this response, then close the connection."""

    def __init__(self, response: Response):
        self.response = response


class Server:
    """``handler(Request) -> Response`` served on ``host:port`` (0 = any free port)."""

    def __init__(self, handler: Callable[[Request], Response], host: str, port: int,
                 settings: ServerSettings = ServerSettings(), ssl_context: ssl.SSLContext | None = None):
        self.handler, self.settings, self.ssl_context = handler, settings, ssl_context
        self._listen = socket.create_server((host, port), backlog=settings.backlog)
        self.server_address = self._listen.getsockname()[:2]
        self._lock = threading.Lock()
        self._active = 0
        self._refusing = 0
        self._stop = threading.Event()
        self._stopped = threading.Event()

    @property
    def connections(self) -> int:
        return self._active

    # ------------------------------------------------------------ accept loop
    def serve_forever(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    sock, _ = self._listen.accept()
                except OSError as exc:
                    if self._stop.is_set():
                        break
                    log.warning("accept failed: %s", exc)  # e.g. out of file descriptors
                    self._stop.wait(0.05)
                    continue
                with self._lock:
                    full = self._active >= self.settings.max_connections
                    refuse = full and self._refusing < max(4, self.settings.max_connections // 8)
                    if not full:
                        self._active += 1
                    elif refuse:
                        self._refusing += 1
                if not full:
                    target = self._connection
                elif refuse:
                    target = self._refuse
                else:
                    sock.close()
                    continue
                threading.Thread(target=target, args=(sock,), daemon=True, name="edgeship-http").start()
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop accepting (open connections finish their current request) and wait for the loop to end."""
        self._stop.set()
        try:
            self._listen.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self._stopped.wait(5)

    def server_close(self) -> None:
        self._stop.set()
        self._listen.close()

    # ------------------------------------------------------------ connections
    def _secure(self, sock: socket.socket) -> socket.socket | None:
        """The TLS handshake (when serving HTTPS), within read_timeout; None when it failed (closed)."""
        if self.ssl_context is None:
            return sock
        sock.settimeout(self.settings.read_timeout)
        try:
            return self.ssl_context.wrap_socket(sock, server_side=True)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; a timeout too
            log.debug("TLS handshake failed: %s", exc)
            sock.close()
            return None

    def _refuse(self, sock: socket.socket) -> None:
        try:
            if (sock := self._secure(sock)) is None:  # type: ignore[assignment]
                return
            sock.settimeout(1.0)
            try:
                sock.recv(self.settings.max_header_bytes)  # usually the request: reading it avoids a reset
            except OSError:
                pass
            r = error(503, f"too many connections (limit {self.settings.max_connections}); retry shortly",
                      retry_after="1")
            data = b"".join(r.body)
            head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: "
                    f"{len(data)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n").encode()
            sock.sendall(head + data)
            _close(sock)
        except OSError:
            sock.close()
        finally:
            with self._lock:
                self._refusing -= 1

    def _connection(self, sock: socket.socket) -> None:
        s = self.settings
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=s.max_header_bytes)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if (sock := self._secure(sock)) is None:  # type: ignore[assignment]
                return
            first = True
            while not self._stop.is_set():
                try:
                    req = self._read(sock, conn, s.read_timeout if first else s.keepalive_timeout)
                    if req is None:
                        return
                    resp = self._handle(req)
                except _Fail as f:
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        self._send(sock, conn, f.response, close=True)
                    return
                first = False
                self._send(sock, conn, resp, close=False, head_only=req.method == "HEAD")
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except OSError as exc:
            log.debug("connection ended: %s", exc)
        except h11.LocalProtocolError as exc:
            log.warning("could not answer: %s", exc)
        finally:
            _close(sock)
            with self._lock:
                self._active -= 1

    def _read(self, sock: socket.socket, conn: h11.Connection, wait: float) -> Request | None:
        """The next complete request, or None when the client closed or stayed idle for ``wait`` s."""
        s = self.settings
        deadline = None
        head: h11.Request | None = None
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                raise _Fail(error(status, f"malformed HTTP request ({exc})")) from exc
            if ev is h11.NEED_DATA:
                now = monotonic()
                left = wait if deadline is None else deadline - now
                if left <= 0:
                    raise _Fail(error(408, f"request not received within {s.read_timeout:g} s"))
                sock.settimeout(left)
                try:
                    data = sock.recv(RECV_BYTES)
                except socket.timeout:
                    if deadline is None:
                        return None  # idle: close quietly
                    raise _Fail(error(408, f"request not received within {s.read_timeout:g} s")) from None
                if deadline is None:
                    deadline = monotonic() + s.read_timeout
                conn.receive_data(data)
                continue
            if isinstance(ev, h11.Request):
                head = ev
                if len(ev.target) + sum(len(k) + len(v) + 4 for k, v in ev.headers) > s.max_header_bytes:
                    raise _Fail(error(431, f"request header fields exceed {s.max_header_bytes} bytes"))
                if deadline is None:
                    deadline = monotonic() + s.read_timeout
                length = _header(ev.headers, b"content-length")
                if length is not None and int(length) > s.max_body_bytes:
                    raise _Fail(_too_large(int(length), s.max_body_bytes))
                if conn.client_is_waiting_for_100_continue:
                    sock.sendall(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            elif isinstance(ev, h11.Data):
                size += len(ev.data)
                if size > s.max_body_bytes:
                    raise _Fail(_too_large(size, s.max_body_bytes))
                chunks.append(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                assert head is not None
                headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers}
                return Request(head.method.decode("ascii", "replace"), head.target.decode("latin-1"), headers,
                               chunks[0] if len(chunks) == 1 else b"".join(chunks))
            else:  # ConnectionClosed, or PAUSED after a protocol switch request
                return None

    def _handle(self, req: Request) -> Response:
        try:
            return self.handler(req)
        except Exception as exc:  # the handler maps its own errors; this is the last line of defence
            log.exception("unhandled error serving %s %s", req.method, req.target)
            return error(500, f"internal error: {type(exc).__name__}")

    def _send(self, sock: socket.socket, conn: h11.Connection, r: Response, close: bool,
              head_only: bool = False) -> None:
        length = sum(len(p) for p in r.body)
        headers = [("content-type", r.content_type), ("content-length", str(length)), *r.headers]
        if close:
            headers.append(("connection", "close"))
        try:
            reason = HTTPStatus(r.status).phrase.encode()
        except ValueError:
            reason = b""
        sock.settimeout(self.settings.read_timeout)
        out = [conn.send(h11.Response(status_code=r.status, headers=headers, reason=reason))]
        if not head_only:
            for part in r.body:
                out += conn.send_with_data_passthrough(h11.Data(data=part))
        out.append(conn.send(h11.EndOfMessage()))
        if length < 65536:
            sock.sendall(b"".join(out))
        else:
            for part in out:
                sock.sendall(part)


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context (TLS 1.2 or later) for the certificate and key files."""
    from agent.errors import ConfigError

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"http.tls_cert/http.tls_key ({cert_file}, {key_file}): cannot load them ({exc})") from exc
    return ctx


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    return next((v for k, v in headers if k == name), None)


def _too_large(size: int, limit: int) -> Response:
    return error(413, f"request body of {size} bytes exceeds the limit of {limit} bytes")


def _close(sock: socket.socket) -> None:
    """Close so that the client reads our last response: stop sending, read (and drop) what it still
    sends for a moment, then close. Closing with unread data would make the kernel send a reset."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(0.5)
        drained = 0
        while drained < DRAIN_BYTES:
            data = sock.recv(65536)
            if not data:
                break
            drained += len(data)
    except OSError:
        pass
    finally:
        sock.close()
