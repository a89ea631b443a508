"""The local control channel of a running agent: a unix socket ``state_dir/agent.sock`` (mode 0600; peers
must run as the agent's user or root) speaking one JSON request and one JSON response per connection,
each a single line of bounded size.

    {"op": "status"}
    {"op": "install", "bundle": "/abs/path.bundle", "allow_downgrade": false, "allow_model_change": false}
    {"op": "rollback"}
    -> {"ok": true, "result": {...}} | {"ok": false, "error": "...", "exit_code": 1}

`edgeship-agent install|rollback|status` beside a running agent go through it, so the service that
serves the model is the one that changes it, and `status` reports what it serves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import struct
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from agent.errors import AgentError, ControlError

if TYPE_CHECKING:
    from agent.serve.service import Agent

log = logging.getLogger(__name__)
SOCKET_FILE = "agent.sock"
MAX_REQUEST_BYTES = 64 << 10
MAX_RESPONSE_BYTES = 4 << 20
READ_TIMEOUT = 10.0  # seconds a client may take to send its request


def dispatch(agent: "Agent", req: Any) -> dict[str, Any]:
    """Run one request on the running agent; ControlError for a malformed one."""
    from agent import status

    if not isinstance(req, dict) or not isinstance(req.get("op"), str):
        raise ControlError('expected a JSON object {"op": "status" | "install" | "rollback", ...}')
    op = req["op"]
    if op == "status":
        return status.report(agent.store.dir, agent)
    if op == "rollback":
        return {"active": agent.rollback()}
    if op == "install":
        bundle, flags = req.get("bundle"), [req.get(k, False) for k in ("allow_downgrade", "allow_model_change")]
        if not isinstance(bundle, str) or not os.path.isabs(bundle) or not all(isinstance(f, bool) for f in flags):
            raise ControlError("install: expected an absolute bundle path and boolean flags")
        return agent.install(Path(bundle), *flags).__dict__
    raise ControlError(f"unknown request {op!r} (status, install, rollback)")


class ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Serves ``dispatch`` on the state dir's socket. Start it only while holding the state dir's lock."""

    daemon_threads = True

    def __init__(self, agent: "Agent"):
        self.agent = agent
        self.path = agent.store.dir / SOCKET_FILE
        self.path.unlink(missing_ok=True)  # left by an agent that was killed: we own the state dir now
        old = os.umask(0o177)  # the socket is created 0600: no window in which others may connect
        try:
            with _short(self.path) as addr:
                super().__init__(addr, _Handler)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._thread = threading.Thread(target=self.serve_forever, name="edgeship-control", daemon=True)

    def start(self) -> "ControlServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.path.unlink(missing_ok=True)


class _Handler(socketserver.BaseRequestHandler):
    server: ControlServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(READ_TIMEOUT)
        try:
            line = _read_line(sock, MAX_REQUEST_BYTES, "request")  # bounded and timed out: read, then judge
            _check_peer(sock)
            req = json.loads(line)
            sock.settimeout(None)  # an install may take minutes
            resp: dict[str, Any] = {"ok": True, "result": dispatch(self.server.agent, req)}
        except AgentError as exc:
            resp = {"ok": False, "error": str(exc), "exit_code": exc.exit_code}
        except (ValueError, OSError) as exc:
            resp = {"ok": False, "error": f"bad request ({exc})", "exit_code": 2}
        except Exception as exc:  # the channel must survive any request
            log.exception("control request failed")
            resp = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}", "exit_code": 1}
        with contextlib.suppress(OSError):  # the client may have gone away
            sock.sendall(json.dumps(resp, default=str).encode() + b"\n")


def call(state_dir: Path, request: dict[str, Any], timeout: float | None = 10.0) -> dict[str, Any] | None:
    """Send ``request`` to the agent running on ``state_dir``. None: no agent listens there.
    ControlError: the agent refused the request, or stopped before answering."""
    path = Path(state_dir) / SOCKET_FILE
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            with _short(path) as addr:
                sock.connect(addr)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            return None  # no socket, or one left by a killed agent
        sock.settimeout(timeout)
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
            raw = _read_line(sock, MAX_RESPONSE_BYTES, "response")
        except (OSError, ValueError) as exc:
            raise ControlError(f"{path}: no answer from the running agent ({exc}); see its log") from exc
    finally:
        sock.close()
    if not raw:
        raise ControlError(f"{path}: the running agent closed the connection without answering "
                           f"(did it stop? see its log)")
    try:
        resp = json.loads(raw)
    except ValueError as exc:
        raise ControlError(f"{path}: malformed answer from the running agent ({exc})") from exc
    if not resp.get("ok"):
        err = ControlError(str(resp.get("error")))
        err.exit_code = int(resp.get("exit_code", 1))
        raise err
    return resp.get("result") or {}


def _read_line(sock: socket.socket, limit: int, what: str) -> bytes:
    """Read up to a newline or EOF, refusing more than ``limit`` bytes."""
    buf = bytearray()
    while b"\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit + 1:
            raise ValueError(f"{what} exceeds {limit} bytes")
    line = bytes(buf).split(b"\n", 1)[0]
    if len(line) > limit:
        raise ValueError(f"{what} exceeds {limit} bytes")
    return line


def _check_peer(sock: socket.socket) -> None:
    """Only the agent's own user (or root) may control it, whatever the socket's mode."""
    _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    if uid not in (0, os.getuid()):
        raise ControlError(f"user {uid} may not control this agent (runs as {os.getuid()})")


@contextlib.contextmanager
def _short(path: Path) -> Iterator[str]:
    """A unix socket address is limited to 107 bytes: reach a deep state dir through /proc/self/fd."""
    if len(os.fsencode(str(path))) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)
