"""Local inference HTTP API: routes, and every error as a JSON answer with the right status.

- Open Inference Protocol v2 (KServe / Triton REST) with the binary tensor data, classification,
  model configuration, parameters and sequence extensions (``agent/serve/v2.py``): ``/v2``,
  ``/v2/health/{live,ready}``, ``/v2/models/{name}[/versions/{v}]``, ``.../ready``, ``.../config``,
  ``.../infer``. The real ``tritonclient[http]`` works with its default settings.
- The simple ``POST /predict`` {"input": [...]} -> {"prediction": [...]} of hand-written Flask servers.
- ``GET /metrics`` in Prometheus text format.
With a token (``[http] token_file``), every endpoint needs ``Authorization: Bearer <token>`` (401 without it);
with ``[http] tls_cert``/``tls_key`` the API is HTTPS. Both matter only when the API is bound beyond 127.0.0.1.
Bad input gets a 4xx naming what was expected; a model that fails or answers NaN/Inf gets a 500; no
answer ever contains a NaN literal. The transport (limits, timeouts, connection cap) is ``server.py``.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import re
import threading
import zlib
from typing import Any

import numpy as np

from agent import __version__
from agent.errors import AgentError, CapacityError, HTTPError, InputError, NotReadyError
from agent.serve import v2
from agent.serve.server import Request, Response, Server, ServerSettings, error, tls_context
from agent.serve.service import Agent, Loaded

log = logging.getLogger(__name__)
_MODEL = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer|/config|/feedback|/stats)?$")
_JSON = "application/json"
_FIXED = {"/v2": ("GET",), "/v2/health/live": ("GET",), "/v2/health/ready": ("GET",), "/metrics": ("GET",),
          "/predict": ("POST",), "/v2/models/stats": ("GET",)}


class App:
    """``handle(Request) -> Response`` for the agent's HTTP API."""

    def __init__(self, agent: Agent, max_body_bytes: int = 16 << 20, token: str | None = None):
        self.agent, self.max_body = agent, max_body_bytes
        self._token = token.encode() if token else None

    def handle(self, req: Request) -> Response:
        path = req.target.split("?", 1)[0]
        scheme, _, given = req.headers.get("authorization", "").strip().partition(" ")
        if self._token is not None and not (scheme.lower() == "bearer" and hmac.compare_digest(
                given.strip().encode("latin-1", "replace"), self._token)):  # the scheme is case-insensitive
            return error(401, "this API needs a bearer token: send 'Authorization: Bearer <token>' (the agent's "
                              "[http] token_file)", www_authenticate='Bearer realm="edgeship-agent"')
        try:
            return self._route(req, path)
        except HTTPError as exc:
            return error(exc.status, str(exc))
        except (NotReadyError, CapacityError) as exc:
            return error(503, str(exc))
        except InputError as exc:
            return error(400, str(exc))
        except AgentError as exc:  # the model failed or answered NaN/Inf: counted as an error
            log.warning("%s %s: %s", req.method, path, exc)
            return error(500, str(exc))

    def _route(self, req: Request, path: str) -> Response:
        m = _MODEL.match(path)
        allowed = _FIXED.get(path) or (None if m is None else ("POST",) if m.group(3) in ("/infer", "/feedback")
                                       else ("GET",))
        if allowed is None:
            raise HTTPError(404, f"no such endpoint: {req.method} {path}")
        if req.method not in allowed:
            return error(405, f"{req.method} is not allowed on {path}; use {' or '.join(allowed)}",
                         allow=", ".join(allowed))
        cur = self.agent.current
        if path == "/v2/health/live":
            return _json({"live": True})
        if path == "/v2/health/ready":
            return _json({"ready": cur is not None}, 200 if cur else 503)
        if path == "/v2":
            ext = sorted([*v2.EXTENSIONS, "feedback"]) if self.agent.capture is not None else v2.EXTENSIONS
            return _json({"name": "edgeship-agent", "version": __version__, "extensions": ext})
        if path == "/metrics":
            return Response(200, [self.agent.metrics.prometheus(cur).encode()], "text/plain; version=0.0.4")
        if path == "/predict":
            return self._predict(req)
        if path == "/v2/models/stats":
            return _json({"model_stats": self.agent.metrics.triton_stats("")})
        name, version, action = m.group(1), m.group(2), m.group(3)
        if action == "/feedback":  # about a request answered before: maybe by a version no longer loaded
            return self._feedback(req, name, version)
        cur = _check_model(cur, name, version)
        if action is None:
            return _json(v2.metadata(cur.manifest, cur.runner.inputs, cur.runner.outputs))
        if action == "/ready":
            return _json({"name": name, "ready": True})
        if action == "/stats":  # every version this agent served since it started
            return _json({"model_stats": self.agent.metrics.triton_stats(name, version)})
        if action == "/config":
            return _json(v2.config(cur.manifest, cur.runner, self.agent.interpreters))
        return self._infer(req, cur)

    def _infer(self, req: Request, cur: Loaded) -> Response:
        body = self._decoded(req)
        r = cur.runner
        ir = v2.parse_infer(body, req.headers.get("inference-header-content-length"), r.all_inputs, r.all_outputs,
                            r.outputs)
        capture = self.agent.capture
        if capture is not None and ir.id is None:  # the response carries the id that feedback refers to
            ir = dataclasses.replace(ir, id=capture.new_id())
        answered, out = self.agent.infer(ir.inputs, ir.sequence, ir.id if capture is not None else None)
        if not ir.outputs_asked:  # a client that carried the model's state gets the next state back too
            extra = tuple(v2.Wanted(n, ir.outputs[0].binary if ir.outputs else False) for n in out
                          if n not in {w.name for w in ir.outputs})
            ir = dataclasses.replace(ir, outputs=ir.outputs + extra)
        head, parts = v2.encode_infer(answered.manifest, answered.runner.all_outputs, ir, out)
        if not parts:
            return Response(200, [head])
        return Response(200, [head, *parts], "application/octet-stream",
                        [("inference-header-content-length", str(len(head)))])

    def _predict(self, req: Request) -> Response:
        doc = v2.loads(self._decoded(req))
        if not isinstance(doc, dict) or "input" not in doc:
            raise HTTPError(400, 'expected {"input": [...]} (one sample or a batch)')
        try:
            arr = np.asarray(doc["input"], dtype=np.float32)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise HTTPError(400, f"input: not a numeric array ({exc})") from exc
        if not np.isfinite(arr).all():
            raise HTTPError(400, "input: NaN/Inf values (or numbers beyond float32) are not allowed")
        capture = self.agent.capture
        rid = capture.new_id() if capture is not None else None
        cur, out = self.agent.infer(arr, request_id=rid)
        first = next(iter(out.values()))
        res: dict[str, Any] = {"prediction": first.tolist(), "model": cur.manifest.id}
        if rid is not None:
            res["id"] = rid
        if cur.manifest.labels and first.ndim == 2 and first.shape[1] == len(cur.manifest.labels):
            res["label"] = [cur.manifest.labels[i] for i in first.argmax(1)]
        return _json(res)

    def _feedback(self, req: Request, name: str, version: str | None) -> Response:
        """``{"id": ID, "label": L}`` or ``{"id": ID, "labels": [L, ...]}`` (one per sample of the request; a
        class index or a label name of the model): the ground truth for a request this agent answered."""
        from agent.capture.feedback import parse_feedback

        capture = self.agent.capture
        if capture is None:
            raise HTTPError(404, "feedback needs prediction capture: set [capture] enabled = true in agent.toml")
        rid, labels = parse_feedback(v2.loads(self._decoded(req)))
        rec = capture.recent(rid)
        if rec is None or rec.model != name or (version is not None and version != str(rec.version)):
            raise HTTPError(404, f"no recent request {rid!r} of model {name!r}"
                                 + (f" version {version}" if version is not None else "")
                                 + f" on this agent (it remembers the last {capture.cfg.recent} requests)")
        labels = _label_ids(labels, rec)
        capture.feedback(rid, rec, labels)
        return _json({"id": rid, "model_name": rec.model, "model_version": str(rec.version), "labels": labels,
                      "predicted": list(rec.predicted)})

    def _decoded(self, req: Request) -> bytes:
        """The body, inflated when the client compressed it (gzip/deflate), never beyond the body limit."""
        enc = req.headers.get("content-encoding", "identity").strip().lower()
        if enc == "identity":
            return req.body
        if enc not in ("gzip", "deflate"):
            raise HTTPError(415, f"Content-Encoding {enc!r} is not supported (use gzip, deflate or none)")
        d = zlib.decompressobj(wbits=31 if enc == "gzip" else 15)
        try:
            out = d.decompress(req.body, self.max_body + 1)
        except zlib.error as exc:
            raise HTTPError(400, f"body is not valid {enc} data ({exc})") from exc
        if len(out) > self.max_body:
            raise HTTPError(413, f"decompressed body exceeds the limit of {self.max_body} bytes")
        return out


def _check_model(cur: Loaded | None, name: str, version: str | None) -> Loaded:
    if cur is None:
        raise NotReadyError("no model installed")
    if name != cur.manifest.name:
        raise HTTPError(404, f"unknown model {name!r}; this agent serves {cur.manifest.name!r}")
    if version is not None and version != str(cur.manifest.version):
        raise HTTPError(404, f"model {name!r} version {version} is not loaded (serving {cur.manifest.version})")
    return cur


def _label_ids(labels: list[int | str], rec: Any) -> list[int]:
    """Class indices for ``labels`` (indices, or label names of the version that answered)."""
    if len(labels) != len(rec.predicted):
        raise HTTPError(400, f"labels: the request had {len(rec.predicted)} sample(s); give one label each")
    names = rec.names
    out = []
    for i, x in enumerate(labels):
        if isinstance(x, str):
            if x not in names:
                raise HTTPError(400, f"labels[{i}]: {x!r:.60} is not a label of this model"
                                     + (f" ({', '.join(names[:20])})" if names else " (it has no label names)"))
            x = names.index(x)
        if not 0 <= x < rec.classes:
            raise HTTPError(400, f"labels[{i}]: class {x} is out of range (the model has {rec.classes} classes)")
        out.append(x)
    return out


def _json(doc: Any, status: int = 200) -> Response:
    return Response(status, [v2.dumps(doc)], _JSON)


def settings_of(cfg: Any) -> ServerSettings:
    """Server settings from the agent's Config."""
    return ServerSettings(max_body_bytes=cfg.max_body_bytes, max_header_bytes=cfg.max_header_bytes,
                          max_connections=cfg.max_connections, backlog=cfg.backlog,
                          read_timeout=cfg.read_timeout, keepalive_timeout=cfg.keepalive_timeout)


def make_server(agent: Agent, host: str = "127.0.0.1", port: int = 8080, max_body_bytes: int | None = None,
                settings: ServerSettings | None = None, token: str | None = None,
                tls: tuple[str, str] | None = None) -> Server:
    """``token``: require it as a bearer token; ``tls``: (certificate file, key file) to serve HTTPS."""
    settings = settings or ServerSettings()
    if max_body_bytes is not None:
        settings = ServerSettings(**{**settings.__dict__, "max_body_bytes": max_body_bytes})
    if host not in ("127.0.0.1", "::1", "localhost") and not token:
        log.warning("the HTTP API on %s is open to anyone who can reach it: set [http] token_file (and tls_cert)",
                    host)
    return Server(App(agent, settings.max_body_bytes, token).handle, host, port, settings,
                  tls_context(*tls) if tls else None)


def serve_in_thread(server: Server) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, name="edgeship-http", daemon=True)
    t.start()
    return t
