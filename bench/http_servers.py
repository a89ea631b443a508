"""HTTP server candidates for the agent's local API, and the hand-written Flask + LiteRT baseline.

    python bench/http_servers.py KIND PORT STATE_DIR KEYRING   (agent App behind a transport)
    python bench/http_servers.py flask PORT MODEL.tflite       (baseline: Flask + LiteRT, no agent)

KIND: h11-threads (what the agent ships: agent/serve/server.py), http.server (the standard library's
ThreadingHTTPServer, the agent's transport before), asyncio-h11 (h11 on asyncio streams, requests run in
a thread pool), uvicorn (h11), aiohttp. Each serves the same agent ``App`` so only the transport differs;
inference runs off the event loop on the asyncio ones (a model may take milliseconds). Prints "ready"
when listening. ``GET /rss`` answers the process's VmRSS in kB.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0])


def flask_baseline(port: int, model: str) -> None:
    """What a user would write by hand: Flask, one LiteRT interpreter behind a lock, JSON in and out."""
    import logging
    import threading

    import numpy as np
    from ai_edge_litert.interpreter import Interpreter
    from flask import Flask, jsonify, request

    it = Interpreter(model_path=model, num_threads=1)
    it.allocate_tensors()
    din, dout = it.get_input_details()[0], it.get_output_details()[0]
    lock = threading.Lock()
    app = Flask("baseline")

    @app.post("/predict")
    def predict():
        x = np.asarray(request.get_json()["input"], np.float32).reshape(din["shape"])
        scale, zp = din["quantization"]
        if scale:
            x = np.clip(np.rint(x / scale + zp), -128, 127).astype(din["dtype"])
        with lock:
            it.set_tensor(din["index"], x)
            it.invoke()
            y = it.get_tensor(dout["index"])
        scale, zp = dout["quantization"]
        if scale:
            y = (y.astype(np.float32) - zp) * scale
        return jsonify({"prediction": y.tolist()})

    @app.get("/rss")
    def rss():
        return str(rss_kb())

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    print("ready", flush=True)
    app.run("127.0.0.1", port, threaded=True)


def agent_app(state: str, keyring: str):
    from agent.keys import Keyring
    from agent.serve.http import App
    from agent.serve.server import Response
    from agent.serve.service import Agent

    agent = Agent(Path(state), Keyring.load(keyring), "aarch64", threads=1)
    agent.start()
    app = App(agent)

    def handle(req):
        if req.target == "/rss":
            return Response(200, [str(rss_kb()).encode()], "text/plain")
        return app.handle(req)
    return handle


def main() -> None:
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind == "flask":
        return flask_baseline(port, sys.argv[3])
    handle = agent_app(sys.argv[3], sys.argv[4])
    from agent.serve.server import Request

    if kind == "h11-threads":
        from agent.serve.server import Server

        server = Server(handle, "127.0.0.1", port)
        print("ready", flush=True)
        server.serve_forever()
    elif kind == "http.server":
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *a):
                pass

            def do_GET(self):
                self._do("GET")

            def do_POST(self):
                self._do("POST")

            def _do(self, method):
                n = int(self.headers.get("Content-Length", 0))
                r = handle(Request(method, self.path, {k.lower(): v for k, v in self.headers.items()},
                                   self.rfile.read(n)))
                data = b"".join(r.body)
                self.send_response(r.status)
                self.send_header("Content-Type", r.content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        s = ThreadingHTTPServer(("127.0.0.1", port), H)
        s.daemon_threads = True
        print("ready", flush=True)
        s.serve_forever()
    else:
        asyncio_server(kind, port, handle, Request)


def asyncio_server(kind: str, port: int, handle, Request) -> None:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(2)

    async def run(req):
        return await asyncio.get_running_loop().run_in_executor(pool, handle, req)

    if kind == "uvicorn":
        import uvicorn

        async def app(scope, receive, send):
            if scope["type"] != "http":
                return
            body = b""
            while True:
                m = await receive()
                body += m.get("body", b"")
                if not m.get("more_body"):
                    break
            r = await run(Request(scope["method"], scope["path"],
                                  {k.decode(): v.decode() for k, v in scope["headers"]}, body))
            data = b"".join(r.body)
            await send({"type": "http.response.start", "status": r.status,
                        "headers": [(b"content-type", r.content_type.encode()),
                                    (b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data})

        print("ready", flush=True)
        uvicorn.run(app, host="127.0.0.1", port=port, http="h11", loop="asyncio", lifespan="off",
                    log_level="error", access_log=False)
    elif kind == "aiohttp":
        from aiohttp import web

        async def h(request):
            r = await run(Request(request.method, request.path, {k.lower(): v for k, v in request.headers.items()},
                                  await request.read()))
            return web.Response(body=b"".join(r.body), status=r.status, content_type=r.content_type.split(";")[0])

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", h)
        print("ready", flush=True)
        web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
    elif kind == "asyncio-h11":
        import h11

        async def conn(reader, writer):
            c = h11.Connection(h11.SERVER)
            while True:
                ev = c.next_event()
                if ev is h11.NEED_DATA:
                    data = await reader.read(262144)
                    c.receive_data(data)
                    if not data:
                        break
                elif isinstance(ev, h11.Request):
                    head, body = ev, b""
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    r = await run(Request(head.method.decode(), head.target.decode(),
                                          {k.decode(): v.decode() for k, v in head.headers}, body))
                    data = b"".join(r.body)
                    writer.write(c.send(h11.Response(status_code=r.status, headers=[
                        ("content-type", r.content_type), ("content-length", str(len(data)))]))
                        + c.send(h11.Data(data=data)) + c.send(h11.EndOfMessage()))
                    c.start_next_cycle()
                else:
                    break
            writer.close()

        async def serve():
            srv = await asyncio.start_server(conn, "127.0.0.1", port, backlog=1024)
            print("ready", flush=True)
            async with srv:
                await srv.serve_forever()

        asyncio.run(serve())
    else:
        raise SystemExit(f"unknown server kind {kind!r}")


if __name__ == "__main__":
    main()
