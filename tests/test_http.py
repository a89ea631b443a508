"""Local HTTP API with real requests: Open Inference Protocol v2, /predict, /metrics, bad input."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import time

import numpy as np
import pytest

from agent.serve.http import make_server, serve_in_thread
from agent.serve.service import Agent
from conftest import DEVICE_ARCH, PYTHON, ROOT, device_bundle

pytestmark = pytest.mark.device


@pytest.fixture(scope="module")
def served(digits_build, keyring, tmp_path_factory):
    bundle = device_bundle(digits_build)
    agent = Agent(tmp_path_factory.mktemp("agent") / "state", keyring, DEVICE_ARCH)
    agent.start()
    server = make_server(agent, "127.0.0.1", 0, max_body_bytes=200_000)
    serve_in_thread(server)
    yield agent, server.server_address[1], bundle
    server.shutdown()
    server.server_close()


def req(port, method, path, body=None, raw=None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    c.request(method, path, body=data, headers=headers or {"Content-Type": "application/json"})
    r = c.getresponse()
    text = r.read().decode()
    c.close()
    try:
        return r.status, json.loads(text)
    except ValueError:
        return r.status, text


def test_not_ready_until_installed_then_v2_metadata(served):
    agent, port, bundle = served
    if agent.current is None:
        assert req(port, "GET", "/v2/health/ready")[0] == 503
        assert req(port, "POST", "/predict", {"input": [0] * 64})[0] == 503
        assert agent.install(bundle).ok
    assert req(port, "GET", "/v2/health/live") == (200, {"live": True})
    assert req(port, "GET", "/v2/health/ready") == (200, {"ready": True})
    status, meta = req(port, "GET", "/v2/models/digits")
    assert status == 200 and meta["name"] == "digits" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 8, 8, 1]}]
    assert req(port, "GET", "/v2/models/digits/ready") == (200, {"name": "digits", "ready": True})
    assert req(port, "GET", "/v2/models/digits/versions/1/ready")[0] == 200


def test_v2_infer_matches_python_api(served, digits):
    agent, port, bundle = served
    if agent.current is None:
        agent.install(bundle)
    with np.load(digits["validation"]) as v:
        x, y = v["image"][:4], v["y"][:4]
    body = {"id": "r1", "inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                                    "data": x.ravel().tolist()}]}
    status, res = req(port, "POST", "/v2/models/digits/infer", body)
    assert status == 200, res
    assert res["id"] == "r1" and res["model_name"] == "digits" and res["model_version"] == "1"
    out = res["outputs"][0]
    assert out["name"] == "probs" and out["shape"] == [4, 10] and out["datatype"] == "FP32"
    probs = np.array(out["data"]).reshape(4, 10)
    np.testing.assert_allclose(probs, agent.predict(x)["probs"], atol=1e-6)
    assert (probs.argmax(1) == y).sum() >= 3
    status, res = req(port, "POST", "/predict", {"input": x[0].tolist()})
    assert status == 200 and len(res["prediction"]) == 1 and res["label"][0] == str(probs[0].argmax())


@pytest.mark.parametrize("path, body, raw, status, match", [
    ("/v2/models/digits/infer", {"inputs": [{"name": "image", "shape": [1, 8, 8], "datatype": "FP32",
                                             "data": [0.0] * 64}]}, None, 400, "expected shape (N, 8, 8, 1)"),
    ("/v2/models/digits/infer", {"inputs": [{"name": "image", "shape": [1, 8, 8, 1], "datatype": "FP32",
                                             "data": [0.0] * 10}]}, None, 400, "data has 10 values"),
    ("/v2/models/digits/infer", {"inputs": [{"name": "image", "shape": [1, 8, 8, 1], "datatype": "BYTES",
                                             "data": ["a"] * 64}]}, None, 400, "does not match the model's FP32"),
    ("/v2/models/digits/infer", {"inputs": [{"name": "image", "shape": [1, 64], "datatype": "FP32",
                                             "data": [float("nan")] * 64}]}, None, 400, "NaN"),
    ("/v2/models/digits/infer", {"inputs": [{"name": "pixels", "shape": [1, 8, 8, 1], "datatype": "FP32",
                                             "data": [0.0] * 64}]}, None, 400, "inputs are ['image']"),
    ("/v2/models/digits/infer", {"nope": 1}, None, 400, "inputs: expected a non-empty list"),
    ("/v2/models/digits/infer", None, b"{not json", 400, "malformed JSON"),
    ("/v2/models/cats/infer", {"inputs": []}, None, 404, "unknown model 'cats'"),
    ("/v2/models/digits/versions/9/infer", {"inputs": []}, None, 404, "version 9 is not loaded"),
    ("/predict", {"input": "hello"}, None, 400, "not a numeric array"),
    ("/predict", {"x": 1}, None, 400, 'expected {"input"'),
    ("/v2/nothing", {}, None, 404, "no such endpoint"),
])
def test_bad_requests_get_clear_4xx(served, path, body, raw, status, match):
    agent, port, bundle = served
    if agent.current is None:
        agent.install(bundle)
    got, res = req(port, "POST", path, body, raw)
    assert got == status and match in res["error"], res
    assert req(port, "GET", "/v2/health/live")[0] == 200  # still serving


def test_oversized_body_refused(served):
    _, port, _ = served
    big = json.dumps({"input": [0.0] * 100_000}).encode()
    status, res = req(port, "POST", "/predict", raw=big)
    assert status == 413 and "exceeds the limit of 200000 bytes" in res["error"]
    assert req(port, "GET", "/v2/health/live")[0] == 200


def x_ok():
    return np.zeros((1, 8, 8, 1), np.float32).tolist()


def test_metrics_prometheus(served):
    agent, port, bundle = served
    if agent.current is None:
        agent.install(bundle)
    def count(text, name):
        m = re.search(name + r'\{model="digits",version="1"\} (\d+)', text)
        return int(m.group(1)) if m else 0

    before = req(port, "GET", "/metrics")[1]
    assert req(port, "POST", "/predict", {"input": x_ok()})[0] == 200
    status, res = req(port, "POST", "/predict", {"input": [[0.0] * 1] * 64})  # the client's mistake: a 400
    assert status == 400, res
    status, text = req(port, "GET", "/metrics")
    assert status == 200
    assert count(text, "edgeship_requests_total") == count(before, "edgeship_requests_total") + 1
    assert count(text, "edgeship_errors_total") == count(before, "edgeship_errors_total")  # not a model failure
    assert 'edgeship_latency_ms_bucket{model="digits",version="1",le="+Inf"}' in text
    assert 'edgeship_active_model_version{model="digits"} 1' in text


def test_run_service_subprocess(digits_build, settings, tmp_path):
    """`edgeship-agent run` as a process: installs at start-up and answers over HTTP."""
    bundle = device_bundle(digits_build)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\nstate_dir = "{tmp_path / "state"}"\nkeyring = "{settings.keyring_path}"\n'
                   f'arch = "{DEVICE_ARCH}"\ndevice_id = "pi-test"\n[http]\nport = 0\n')
    proc = subprocess.Popen([*PYTHON, "-m", "agent.cli", "run", "--config", str(cfg),
                             "--install", str(bundle)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert "edgeship-agent pi-test: serving" in line, line
        port = int(line.rsplit(":", 1)[1])
        for _ in range(100):
            if req(port, "GET", "/v2/health/ready")[0] == 200:
                break
            time.sleep(0.1)
        status, res = req(port, "POST", "/predict", {"input": [[[0.0]] * 8] * 8})
        assert status == 200 and res["model"] == "digits@1"
        if not os.environ.get("EDGESHIP_DEVICE_INPUTS"):  # (the emulated userlands have no tritonclient)
            import tritonclient.http as httpclient  # the published v2 client, default settings (binary data)

            client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
            x = np.zeros((3, 8, 8, 1), np.float32)
            out = client.infer("digits", [httpclient.InferInput("image", [3, 8, 8, 1], "FP32").set_data_from_numpy(x)])
            assert out.as_numpy("probs").shape == (3, 10) and out.get_response()["model_version"] == "1"
            client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0
