"""`edgeship capture receive`: an HTTP endpoint for devices told to upload captured records to a URL (a
capture request's ``url``) instead of sending them over MQTT. Each POST is one capture message exactly as
over MQTT (agent/fleet/capture_wire.py), from the device named in ``X-Edgeship-Device``; it is checked and
stored in the fleet database like the collector stores MQTT ones, then answered 204 (the device deletes
what was acknowledged); a message that does not decode is recorded as rejected and answered 422, which the
device also takes as final (as over MQTT, where the broker acknowledged it): retrying would not help. Unlike MQTT, where the broker's login and ACL pin a device to its own topics, this
endpoint cannot tell who is posting: run it behind TLS with client certificates (or another
authenticating proxy) that checks the header against the device's identity.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from agent.errors import ProtocolError
from agent.fleet.capture_wire import MAX_MESSAGE_BYTES
from agent.fleet.protocol import device_topic
from toolkit.capture import store
from toolkit.fleet.collector import SQL, open_db

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_CONNECTIONS = 64  # open at once; more are closed at once
READ_TIMEOUT_S = 30.0  # a client that stops sending mid-request is dropped


class _Server(ThreadingHTTPServer):
    """A thread per connection, at most MAX_CONNECTIONS of them."""

    daemon_threads = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class Receiver:
    def __init__(self, db_path: Path, fleet: str, host: str = "127.0.0.1", port: int = 0):
        self.db = open_db(db_path)
        self.fleet, self.lock, self.stored, self.rejected = fleet, threading.Lock(), 0, 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            timeout = READ_TIMEOUT_S

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                status, msg = receiver.handle(self.headers.get("X-Edgeship-Device", ""),
                                              self.headers.get("X-Edgeship-Fleet", ""),
                                              self.headers.get("Content-Length"), self.rfile)
                body = msg.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: object) -> None:
                log.debug("capture receive: " + fmt, *args)

        self.server = _Server((host, port), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}/capture"
        self._thread = threading.Thread(target=self.server.serve_forever, name="edgeship-capture-receive", daemon=True)

    def start(self) -> "Receiver":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.db.close()

    def handle(self, device: str, fleet: str, length: str | None, body) -> tuple[int, str]:
        if not _NAME.match(device) or (fleet and fleet != self.fleet):
            return 400, f"X-Edgeship-Device must name the device (and X-Edgeship-Fleet be {self.fleet!r})\n"
        if length is None or not (length.isascii() and length.isdigit()):
            return 411, "Content-Length required\n"
        if int(length) > MAX_MESSAGE_BYTES:
            return 413, f"a capture message is at most {MAX_MESSAGE_BYTES} bytes\n"
        payload = body.read(int(length))
        if len(payload) != int(length):
            return 400, f"body ended after {len(payload)} of {length} bytes\n"
        where = device_topic(self.fleet, device, "capture") + " (HTTP)"
        try:
            rows = store.parse_rows("capture", device, where, payload, time.time())
        except Exception as exc:  # ProtocolError; anything else is a parser bug, and still this message's fault
            if not isinstance(exc, ProtocolError):
                log.exception("unexpected error parsing an upload from %s", device)
            return self._reject([(where, f"{exc}")])
        with self.lock, self.db:
            for kind, values in rows:
                self.db.execute(SQL[kind], values)
            bad = store.join_parts(self.db)
        if bad:  # the last part of a record that does not decode: not acknowledged as stored
            return self._reject(bad)
        self.stored += 1
        return 204, ""

    def _reject(self, bad: list[tuple[str, str]]) -> tuple[int, str]:
        with self.lock, self.db:
            self.db.executemany("INSERT INTO rejected VALUES (?,?,?)",
                                [(time.time(), w[:200], r[:300]) for w, r in bad])
        self.rejected += len(bad)
        return 422, "".join(f"{w}: {r}\n" for w, r in bad)  # stored as rejected: the device moves on
