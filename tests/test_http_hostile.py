"""Hostile and broken clients, with raw sockets and http.client: lengths, bodies, slow senders, floods,
bad numbers, nesting, methods, and models that answer NaN. The agent answers each with a JSON 4xx/5xx
(never a traceback or a NaN literal) and keeps serving everyone else."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

from agent.serve.http import make_server, serve_in_thread
from agent.serve.server import ServerSettings
from agent.serve.service import Agent
from conftest import ROOT
from modelkit import dtype_model, log_model, make_bundle


def exchange(port: int, data: bytes, timeout: float = 30) -> tuple[int, dict, bytes]:
    """Send raw bytes, read one response (status, headers, body) or until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return read_response(s)


def read_response(s: socket.socket) -> tuple[int, dict, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed without a response: {buf!r}")
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    n = int(headers.get("content-length", 0))
    while len(body) < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body[:n]


def nest(depth: int) -> list:
    v: list = [1]
    for _ in range(depth):
        v = [v]
    return v


def post(port, path, body, method="POST"):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request(method, path, body=body if isinstance(body, bytes) else json.dumps(body).encode())
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, dict(r.getheaders()), data


@pytest.fixture(scope="module")
def served(signing_key, keyring, tmp_path_factory):
    """An in-process agent serving the dtype model (INT64/BOOL/UINT8 inputs)."""
    d = tmp_path_factory.mktemp("hostile")
    model, x = dtype_model()
    agent = Agent(d / "state", keyring, "x86_64")
    agent.start()
    assert agent.install(make_bundle(d / "dtypes.bundle", signing_key, model, x, name="dtypes")).ok
    server = make_server(agent, "127.0.0.1", 0, settings=ServerSettings(max_body_bytes=1 << 20, max_connections=256))
    serve_in_thread(server)
    yield agent, server.server_address[1]
    server.shutdown()
    server.server_close()


def infer_body(**override):
    t = {"ids": {"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]},
         "mask": {"name": "mask", "shape": [1, 3], "datatype": "BOOL", "data": [True, False, True]},
         "pix": {"name": "pix", "shape": [1, 3], "datatype": "UINT8", "data": [1, 2, 3]}}
    for k, v in override.items():
        t[k] = {**t[k], **v}
    return {"inputs": list(t.values())}


def test_json_infer_keeps_integer_types(served):
    _, port = served
    status, _, body = post(port, "/v2/models/dtypes/infer", infer_body(ids={"data": [[1], [2], [3_000_000_000]]}))
    assert status == 200, body
    out = {o["name"]: o for o in json.loads(body)["outputs"]}
    assert out["ids2"] == {"name": "ids2", "datatype": "INT64", "shape": [1, 3], "data": [2, 4, 6_000_000_000]}
    assert out["pix_out"]["datatype"] == "UINT8" and out["score"]["data"] == [1.0, 0.0, 3.0]


@pytest.mark.parametrize("body, match", [
    (infer_body(pix={"data": [1, 2, 256]}), "value 256 is out of range for UINT8"),
    (infer_body(ids={"data": [1, 2, 2 ** 63]}), "out of range for INT64"),
    (infer_body(ids={"data": [1, 2, 10 ** 30]}), "out of range for INT64"),
    (infer_body(ids={"data": [[1, 2], [3]]}), "data is not a (nested) list of numbers"),
    (infer_body(ids={"data": [1, 2.5, 3]}), "INT64 data must be integers"),
    (infer_body(mask={"data": [1, 0, 1]}), "BOOL data must be true/false"),
    (infer_body(ids={"data": "123"}), "data has 1 values"),
    (infer_body(ids={"shape": "1x3"}), "shape must be a list"),
    (infer_body(ids={"shape": [1, -3]}), "shape must be a list"),
    (infer_body(ids={"shape": [2 ** 62, 2 ** 62]}), "data has 3 values"),
    (infer_body(ids={"datatype": "FP32"}), "does not match the model's INT64"),
    (infer_body(ids={"parameters": {"binary_data_size": 24}}), "binary data ends after 0 of 24 bytes"),
    (infer_body(ids={"parameters": {"binary_data_size": -1}}), "non-negative integer"),
    ({**infer_body(), "outputs": 5}, "outputs: expected a list"),
    ({**infer_body(), "outputs": [{"name": "ids2", "parameters": {"binary_data": "yes"}}]}, "true or false"),
    ({**infer_body(), "parameters": {"sequence_id": [1]}}, "sequence_id: expected an integer or a string"),
    ({**infer_body(), "id": 5}, "id: expected a string"),
    ({"inputs": 7}, "inputs: expected a non-empty list"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_values_and_types_are_400(served, body, match):
    _, port = served
    status, headers, data = post(port, "/v2/models/dtypes/infer", body)
    assert status == 400 and match in json.loads(data)["error"], data
    assert headers["content-type"] == "application/json"


@pytest.mark.parametrize("raw, match", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (json.dumps(infer_body(ids={"data": nest(40)})).encode(), "nested deeper than 32 levels"),
    (b'{"inputs": [{"name": "ids", "shape": [1], "datatype": "INT64", "data": [NaN]}]}', "NaN is not a number"),
    (b"\xff\xfe{}", "malformed JSON body"),
], ids=["deep-json", "deep-data", "nan-literal", "not-utf8"])
def test_malformed_json_is_400(served, raw, match):
    _, port = served
    status, _, data = post(port, "/v2/models/dtypes/infer", raw)
    assert status == 400 and match in json.loads(data)["error"], data


@pytest.mark.parametrize("method", ["PUT", "HEAD", "OPTIONS", "DELETE", "PATCH"])
def test_other_methods_get_json_405(served, method):
    _, port = served
    status, headers, data = post(port, "/v2/models/dtypes/infer", b"", method=method)
    assert status == 405 and headers["allow"] == "POST" and headers["content-type"] == "application/json"
    if method != "HEAD":
        assert "is not allowed" in json.loads(data)["error"]
    assert post(port, "/v2/health/live", b"", method=method)[1]["allow"] == "GET"


def test_binary_body_with_wrong_sizes(served):
    _, port = served
    head = json.dumps({"inputs": [
        {"name": "ids", "shape": [1, 3], "datatype": "INT64", "parameters": {"binary_data_size": 24}},
        {"name": "mask", "shape": [1, 3], "datatype": "BOOL", "data": [True, True, True]},
        {"name": "pix", "shape": [1, 3], "datatype": "UINT8", "parameters": {"binary_data_size": 3}}]}).encode()
    ids, pix = np.array([5, 6, 7], "<i8").tobytes(), bytes([9, 8, 7])
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for extra, hlen, status, match in [(b"", len(head), 200, None), (b"xx", len(head), 400, "2 bytes of binary data"),
                                       (b"", len(head) + 10 ** 9, 400, "is not a length within"),
                                       (b"", -1, 400, "is not a length within")]:
        c.request("POST", "/v2/models/dtypes/infer", body=head + ids + pix + extra,
                  headers={"Inference-Header-Content-Length": str(hlen)})
        r = c.getresponse()
        data = r.read()
        assert r.status == status, data
        if match:
            assert match in json.loads(data)["error"]
        else:
            assert {o["name"]: o["data"] for o in json.loads(data)["outputs"]}["ids2"] == [10, 12, 14]


def test_200_concurrent_clients_are_not_reset(served):
    _, port = served
    body = json.dumps(infer_body()).encode()
    gate = threading.Barrier(200)
    results: list = []

    def one():
        gate.wait()
        try:
            results.append(post(port, "/v2/models/dtypes/infer", body)[0])
        except OSError as exc:
            results.append(repr(exc))

    threads = [threading.Thread(target=one) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 200, [r for r in results if r != 200][:5]


def test_120_half_sent_requests_do_not_stop_the_agent(served):
    """Before, ~120 connections that sent half a request line stopped the agent answering anyone."""
    _, port = served
    slow = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(120)]
    try:
        for s in slow:
            s.sendall(b"POST /v2/models/dtypes/in")
        assert post(port, "/v2/models/dtypes/infer", infer_body())[0] == 200
    finally:
        for s in slow:
            s.close()


def test_nan_output_is_an_error_not_a_nan_literal(signing_key, keyring, tmp_path):
    model, x = log_model()
    agent = Agent(tmp_path / "state", keyring, "x86_64")
    agent.start()
    assert agent.install(make_bundle(tmp_path / "log.bundle", signing_key, model, x, name="log")).ok
    server = make_server(agent, "127.0.0.1", 0)
    serve_in_thread(server)
    port = server.server_address[1]
    try:
        ok = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        bad = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, -2, 3, 4]}]}
        assert post(port, "/v2/models/log/infer", ok)[0] == 200
        for path, body in [("/v2/models/log/infer", bad), ("/predict", {"input": [[1, -2, 3, 4]]})]:
            status, _, data = post(port, path, body)
            assert status == 500 and b"NaN" not in data.replace(b"NaN/Inf", b"")
            assert "output 'y' contains NaN/Inf" in json.loads(data)["error"]
        metrics = post(port, "/metrics", b"", method="GET")[2].decode()
        assert 'edgeship_requests_total{model="log",version="1"} 3' in metrics
        assert 'edgeship_errors_total{model="log",version="1"} 2' in metrics
        assert agent.current.window.snapshot()["errors"] == 2
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------ an `edgeship-agent run` process

@pytest.fixture(scope="module")
def agent_proc(settings, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("proc")
    cfg = tmp / "agent.toml"
    cfg.write_text(f'[agent]\nstate_dir = "{tmp / "state"}"\nkeyring = "{settings.keyring_path}"\n'
                   f'device_id = "pi-hostile"\n[http]\nport = 0\nmax_body_bytes = 1048576\nread_timeout = 1.0\n'
                   f'keepalive_timeout = 1.0\nmax_connections = 8\n')
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    line = proc.stdout.readline()
    assert "serving" in line, line
    yield proc, int(line.rsplit(":", 1)[1])
    proc.terminate()
    proc.wait(timeout=30)


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) / 1024


def test_negative_content_length_with_50mb_body_keeps_rss_flat(agent_proc):
    proc, port = agent_proc
    before = peak_rss_mb(proc.pid)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")
        try:
            for _ in range(50):
                s.sendall(b"\0" * (1 << 20))
        except OSError:
            pass  # the agent answered and closed: the rest of the body is refused
        status, _, body = read_response(s)
    assert status == 400 and "bad Content-Length" in json.loads(body)["error"]
    assert peak_rss_mb(proc.pid) - before < 10
    assert post(port, "/v2/health/live", b"", method="GET")[0] == 200


@pytest.mark.parametrize("request_bytes, status, match", [
    (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n", 413, "exceeds the limit of 1048576"),
    (b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     + (b"100000\r\n" + b"1" * 0x100000 + b"\r\n") * 2, 413, "exceeds the limit of 1048576"),
    (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}", 408, "not received within 1 s"),
    (b"POST /predict HTTP/1.1\r\nHost: x\r\n\r\n", 400, "malformed JSON body"),
    (b"GET /v2 HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431, "exceed 16384 bytes"),
    (b"GARBAGE\r\n\r\n", 400, "malformed HTTP request"),
], ids=["content-length-over-limit", "chunked-over-limit", "content-length-beyond-body", "no-content-length",
        "header-too-large", "garbage"])
def test_body_limits_and_timeouts(agent_proc, request_bytes, status, match):
    _, port = agent_proc
    got, headers, body = exchange(port, request_bytes)
    assert got == status and match in json.loads(body)["error"], body
    assert headers["content-type"] == "application/json"


def test_slow_clients_cannot_starve_the_agent(agent_proc):
    """max_connections half-sent requests: the next client gets a 503 at once; the slow ones get a 408
    after the read timeout, and then everyone is served again."""
    _, port = agent_proc
    slow = []
    for _ in range(8):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"GET /v2/hea")
        slow.append(s)
    try:
        status = 0
        for _ in range(50):  # the agent counts a connection once its thread started: poll for the 503
            status, _, body = exchange(port, b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n")
            if status == 503:
                break
        assert status == 503 and "too many connections (limit 8)" in json.loads(body)["error"]
        for s in slow:
            assert read_response(s)[0] == 408
    finally:
        for s in slow:
            s.close()
    for _ in range(50):  # closing connections are counted down as their threads end
        status = exchange(port, b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n")[0]
        if status == 200:
            break
    assert status == 200
