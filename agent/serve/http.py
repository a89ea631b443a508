"""Local inference HTTP API (standard library only).

- Open Inference Protocol v2 (KServe / Triton / MLServer REST): /v2, /v2/health/{live,ready},
  /v2/models/{name}[/versions/{v}], .../ready, .../infer with JSON tensors.
- The simple ``POST /predict`` {"input": [...]} -> {"prediction": [...]} of hand-written Flask servers.
- ``GET /metrics`` in Prometheus text format.
Bad input gets a 4xx with a message saying what was expected; the server keeps serving.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from agent import __version__
from agent.errors import AgentError, HTTPError, InputError, NotReadyError
from agent.serve.service import Agent

log = logging.getLogger(__name__)
V2_DTYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT8": np.int8, "UINT8": np.uint8,
             "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "UINT16": np.uint16, "UINT32": np.uint32,
             "UINT64": np.uint64, "BOOL": np.bool_}
_MODEL = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?$")



def make_server(agent: Agent, host: str = "127.0.0.1", port: int = 8080,
                max_body_bytes: int = 16 << 20) -> ThreadingHTTPServer:
    class Handler(_Handler):
        pass

    Handler.agent, Handler.max_body = agent, max_body_bytes
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, name="edgeship-http", daemon=True)
    t.start()
    return t


class _Handler(BaseHTTPRequestHandler):
    agent: Agent
    max_body: int
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes: avoid 40 ms delayed-ACK stalls
    server_version = f"edgeship-agent/{__version__}"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s " + fmt, self.client_address[0], *args)

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        try:
            status, body, ctype = self._route(method, self.path.split("?", 1)[0])
        except HTTPError as exc:
            status, body, ctype = exc.status, {"error": str(exc)}, "application/json"
        except NotReadyError as exc:
            status, body, ctype = 503, {"error": str(exc)}, "application/json"
        except InputError as exc:
            status, body, ctype = 400, {"error": str(exc)}, "application/json"
        except AgentError as exc:
            status, body, ctype = 500, {"error": str(exc)}, "application/json"
        except Exception as exc:  # never let one request take the server down
            log.exception("unexpected error serving %s", self.path)
            status, body, ctype = 500, {"error": f"internal error: {type(exc).__name__}"}, "application/json"
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError as exc:
            raise HTTPError(400, "invalid Content-Length") from exc
        if n > self.max_body:
            self.close_connection = True  # do not read an oversized body
            raise HTTPError(413, f"request body of {n} bytes exceeds the limit of {self.max_body} bytes")
        raw = self.rfile.read(n)
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise HTTPError(400, f"malformed JSON body ({exc})") from exc

    def _route(self, method: str, path: str) -> tuple[int, Any, str]:
        cur = self.agent.current
        if method == "GET" and path == "/v2/health/live":
            return 200, {"live": True}, "application/json"
        if method == "GET" and path == "/v2/health/ready":
            return (200 if cur else 503), {"ready": cur is not None}, "application/json"
        if method == "GET" and path == "/v2":
            return 200, {"name": "edgeship-agent", "version": __version__, "extensions": []}, "application/json"
        if method == "GET" and path == "/metrics":
            return 200, self.agent.metrics.prometheus(cur), "text/plain; version=0.0.4"
        if method == "POST" and path == "/predict":
            return 200, self._simple(self._body()), "application/json"
        m = _MODEL.match(path)
        if not m:
            raise HTTPError(404, f"no such endpoint: {method} {path}")
        name, version, action = m.group(1), m.group(2), m.group(3)
        if cur is None:
            raise NotReadyError("no model installed")
        if name != cur.manifest.name:
            raise HTTPError(404, f"unknown model {name!r}; this agent serves {cur.manifest.name!r}")
        if version is not None and version != str(cur.manifest.version):
            raise HTTPError(404, f"model {name!r} version {version} is not loaded "
                                 f"(serving {cur.manifest.version})")
        if action is None and method == "GET":
            return 200, self._metadata(cur), "application/json"
        if action == "/ready" and method == "GET":
            return 200, {"name": name, "ready": True}, "application/json"
        if action == "/infer" and method == "POST":
            return 200, self._infer(cur, self._body()), "application/json"
        raise HTTPError(405, f"{method} is not allowed on {path}")

    @staticmethod
    def _metadata(cur: Any) -> dict[str, Any]:
        t = lambda s: {"name": s.name, "datatype": "FP32", "shape": list(s.shape)}  # noqa: E731
        return {"name": cur.manifest.name, "versions": [str(cur.manifest.version)],
                "platform": "tensorflow_lite" if cur.manifest.format == "tflite" else "onnxruntime_onnx",
                "inputs": [t(s) for s in cur.model.inputs], "outputs": [t(s) for s in cur.model.outputs]}

    def _infer(self, cur: Any, req: Any) -> dict[str, Any]:
        if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
            raise HTTPError(400, 'expected {"inputs": [{"name", "shape", "datatype", "data"}, ...]}')
        feed = {}
        for i, t in enumerate(req["inputs"]):
            if not isinstance(t, dict) or not {"name", "shape", "datatype", "data"} <= set(t):
                raise HTTPError(400, f"inputs[{i}]: needs name, shape, datatype and data")
            dt = V2_DTYPES.get(str(t["datatype"]).upper())
            if dt is None:
                raise HTTPError(400, f"inputs[{i}]: unsupported datatype {t['datatype']!r} "
                                     f"(use one of {', '.join(V2_DTYPES)})")
            try:
                arr = np.asarray(t["data"], dtype=dt).reshape(t["shape"])
            except (TypeError, ValueError) as exc:
                raise HTTPError(400, f"inputs[{i}] {t['name']!r}: data does not match shape "
                                     f"{t['shape']} / {t['datatype']} ({exc})") from exc
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise HTTPError(400, f"inputs[{i}] {t['name']!r}: NaN/Inf values are not allowed")
            feed[t["name"]] = arr
        out = self.agent.predict(feed)
        wanted = [o.get("name") for o in req.get("outputs") or [] if isinstance(o, dict)]
        unknown = [w for w in wanted if w not in out]
        if unknown:
            raise HTTPError(400, f"unknown outputs {unknown}; model outputs are {list(out)}")
        names = wanted or list(out)
        res: dict[str, Any] = {"model_name": cur.manifest.name, "model_version": str(cur.manifest.version),
                               "outputs": [{"name": n, "datatype": "FP32", "shape": list(out[n].shape),
                                            "data": out[n].astype(np.float32).ravel().tolist()} for n in names]}
        if "id" in req:
            res["id"] = req["id"]
        return res

    def _simple(self, req: Any) -> dict[str, Any]:
        if not isinstance(req, dict) or "input" not in req:
            raise HTTPError(400, 'expected {"input": [...]} (one sample or a batch)')
        cur = self.agent.current
        if cur is None:
            raise NotReadyError("no model installed")
        try:
            arr = np.asarray(req["input"], dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise HTTPError(400, f"input: not a numeric array ({exc})") from exc
        if not np.isfinite(arr).all():
            raise HTTPError(400, "input: NaN/Inf values are not allowed")
        out = self.agent.predict(arr)
        first = next(iter(out.values()))
        res: dict[str, Any] = {"prediction": first.tolist(), "model": cur.manifest.id}
        if cur.manifest.labels and first.ndim == 2 and first.shape[1] == len(cur.manifest.labels):
            res["label"] = [cur.manifest.labels[i] for i in first.argmax(1)]
        return res
