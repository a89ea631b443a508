"""What a client sends, taken as a real client means it: raw quantized integers, one sample of a stacked
model in the model's own shapes, an input the runtime refuses (a 400 that is not a model failure), and
malformed v2 envelopes that must be a 400, never a 500."""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest

from agent.runtime import quantize
from agent.serve.http import make_server, serve_in_thread
from agent.serve.service import Agent
from conftest import DEVICE_ARCH, device_bundle
from modelkit import make_bundle, onnx_model

pytestmark = pytest.mark.device


def _gather_model():
    """y = w[idx]: ONNX Runtime refuses an index outside w with INVALID_ARGUMENT (the client's input)."""
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.arange(5, dtype=np.float32), "w")
    return onnx_model([helper.make_node("Gather", ["w", "idx"], ["y"])], [("idx", "int64", [-1])],
                      [("y", "float32", [-1])], [w]), {"idx": np.array([1, 2], np.int64)}


def _stacked_model():
    """A streaming-style model with a scalar gain and a state [2, 1, 4] whose first axis is not a batch:
    y = x * gain, state_out = state + 1 (the stacked sample layout)."""
    from onnx import TensorProto, helper

    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    nodes = [helper.make_node("Cast", ["gain"], ["g"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x", "g"], ["y"]), helper.make_node("Add", ["state", "one"], ["state_out"])]
    model = onnx_model(nodes, [("x", "float32", [1, 4]), ("state", "float32", [2, 1, 4]), ("gain", "int64", [])],
                       [("y", "float32", [1, 4]), ("state_out", "float32", [2, 1, 4])], [one])
    return model, {"x": np.ones((1, 1, 4), np.float32), "state": np.zeros((1, 2, 1, 4), np.float32),
                   "gain": np.array([3], np.int64)}


def _post(port, path, body, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, json.loads(data)


def _installed(tmp_path, key, keyring, model_and_golden, name, **extra):
    """An Agent serving a bundle of ``model_and_golden`` (a modelkit model and its golden inputs)."""
    model, golden = model_and_golden
    bundle = make_bundle(tmp_path / f"{name}.bundle", key, model, golden, name=name, arch=DEVICE_ARCH, **extra)
    agent = Agent(tmp_path / "s", keyring, DEVICE_ARCH)
    agent.start()
    assert agent.install(bundle).ok
    return agent


def _serve(agent):
    server = make_server(agent, "127.0.0.1", 0)
    serve_in_thread(server)
    return server, server.server_address[1]


def test_raw_quantized_integers_are_taken_as_the_runtime_takes_them(digits_build, digits):
    """An int8 array for an int8-quantized input holds quantized values (as pymicro-wakeword or any TFLite
    pipeline produces them): the agent must not read them as floats and quantize them again."""
    from agent.runtime import load_model

    variants = sorted(device_bundle(digits_build).parent.glob("variants/*int8.tflite"))
    model = next(m for m in map(load_model, variants) if m.inputs[0].quantized)
    spec = model.inputs[0]
    with np.load(digits["validation"]) as v:
        x = v["image"][:4]
    raw = quantize(x, spec)
    assert raw.dtype == np.dtype(spec.dtype)
    out_float, out_raw = model.predict(x), model.predict(raw)
    for k in out_float:
        np.testing.assert_allclose(out_raw[k], out_float[k], atol=1e-6)


def test_an_input_the_runtime_refuses_is_a_400_and_not_a_model_failure(tmp_path, signing_key, keyring):
    agent = _installed(tmp_path, signing_key, keyring, _gather_model(), "gather")
    server, port = _serve(agent)
    try:
        body = {"inputs": [{"name": "idx", "shape": [1], "datatype": "INT64", "data": [7]}]}
        status, res = _post(port, "/v2/models/gather/infer", json.dumps(body))
        assert status == 400 and "does not take this input" in res["error"], res
        body["inputs"][0]["data"] = [4]
        status, res = _post(port, "/v2/models/gather/infer", json.dumps(body))
        assert status == 200 and res["outputs"][0]["data"] == [4.0], res
        window = agent.current.window.snapshot()
        assert window["count"] == 1 and window["errors"] == 0, window  # the refused request is no model error
    finally:
        server.shutdown()
        server.server_close()


def test_one_unstacked_sample_answers_in_the_models_own_shapes(tmp_path, signing_key, keyring):
    """A scalar input and a state whose first axis is not a batch: one sample sent exactly as the model
    takes it comes back exactly as the model answers (no extra sample axis), over v2 and the Python API;
    N stacked samples come back stacked."""
    agent = _installed(tmp_path, signing_key, keyring, _stacked_model(), "stream")
    one = {"x": np.full((1, 4), 2, np.float32), "state": np.zeros((2, 1, 4), np.float32),
           "gain": np.array(3, np.int64)}
    out = agent.predict(one)
    assert out["y"].shape == (1, 4) and out["state_out"].shape == (2, 1, 4)
    np.testing.assert_array_equal(out["y"], np.full((1, 4), 6))
    stacked = agent.predict({k: np.stack([v, v]) for k, v in one.items()})
    assert stacked["y"].shape == (2, 1, 4) and stacked["state_out"].shape == (2, 2, 1, 4)
    server, port = _serve(agent)
    try:
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [2.0] * 4},
                           {"name": "state", "shape": [2, 1, 4], "datatype": "FP32", "data": [0.0] * 8},
                           {"name": "gain", "shape": [], "datatype": "INT64", "data": [3]}]}
        status, res = _post(port, "/v2/models/stream/infer", json.dumps(body))
        assert status == 200, res
        shapes = {o["name"]: o["shape"] for o in res["outputs"]}
        assert shapes == {"y": [1, 4], "state_out": [2, 1, 4]}, shapes
    finally:
        server.shutdown()
        server.server_close()


GOOD = '{"inputs": [{"name": "idx", "shape": [1], "datatype": "INT64", "data": [1]}]'


@pytest.mark.parametrize("body, headers, match", [
    ((GOOD + ', "parameters": []}').encode(), {}, "parameters: expected an object"),
    ((GOOD + "}").encode("utf-16"), {}, "malformed JSON body"),
    ((GOOD + "}").encode(), {"Inference-Header-Content-Length": b"\xb2"}, "is not a length"),
])
def test_malformed_v2_envelopes_are_400s(tmp_path, signing_key, keyring, body, headers, match):
    agent = _installed(tmp_path, signing_key, keyring, _gather_model(), "gather")
    server, port = _serve(agent)
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.putrequest("POST", "/v2/models/gather/infer")
        c.putheader("Content-Type", "application/json")
        c.putheader("Content-Length", str(len(body)))
        for k, v in headers.items():
            c.putheader(k, v)  # a raw byte: latin-1 "²", a digit to str.isdigit
        c.endheaders(body)
        r = c.getresponse()
        res = json.loads(r.read())
        c.close()
        assert r.status == 400 and match in res["error"], (r.status, res)
    finally:
        server.shutdown()
        server.server_close()


def test_declared_state_kept_per_sequence_or_carried_by_the_client(tmp_path, signing_key, keyring):
    """A bundle that declares its state: with a sequence id the agent keeps it (fresh at the start); a
    client that sends the state inputs itself carries it and gets the next state back, over v2 too."""
    from agent.serve.sequences import Sequence
    from modelkit import state_io_model

    agent = _installed(tmp_path, signing_key, keyring, state_io_model(), "acc", state=[{"input": "h_in", "output": "h_out"}])
    x = np.ones((1, 4), np.float32)
    assert agent.predict({"x": x}, Sequence(5, start=True))["y"].tolist() == [[1.0] * 4]
    assert agent.predict({"x": x}, Sequence(5))["y"].tolist() == [[2.0] * 4]
    carried = agent.predict({"x": x, "h_in": np.full((1, 4), 10, np.float32)})
    assert carried["y"].tolist() == [[11.0] * 4] and carried["h_out"].tolist() == [[11.0] * 4]
    with pytest.raises(Exception, match="send either the sequence id or the state"):
        agent.predict({"x": x, "h_in": x}, Sequence(5))
    server, port = _serve(agent)
    try:
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0] * 4},
                           {"name": "h_in", "shape": [1, 4], "datatype": "FP32", "data": [5.0] * 4}]}
        status, res = _post(port, "/v2/models/acc/infer", json.dumps(body))
        assert status == 200, res
        assert {o["name"]: o["data"] for o in res["outputs"]} == {"y": [6.0] * 4, "h_out": [6.0] * 4}
        body = {"inputs": body["inputs"][:1], "parameters": {"sequence_id": 9, "sequence_start": True}}
        status, res = _post(port, "/v2/models/acc/infer", json.dumps(body))
        assert status == 200 and [o["name"] for o in res["outputs"]] == ["y"], res  # state stays on the device
    finally:
        server.shutdown()
        server.server_close()


def test_streaming_state_is_found_by_name():
    from toolkit.build.ingest import IOSpec
    from toolkit.build.state import detect

    def spec(name, shape, dtype="float32"):
        return IOSpec(name, shape, dtype)

    ins = [spec("input", (-1, 512)), spec("state", (2, -1, 128)), spec("sr", (), "int64"),
           spec("recurrent", (1, -1, 64)), spec("cache_0", (-1, 64, 2)), spec("h0", (1, 1, 32)),
           spec("input_ids", (-1, 8), "int64"), spec("mem", (1, 4))]
    outs = [spec("output", (-1, 1)), spec("stateN", (2, -1, 128)), spec("next_recurrent", (1, -1, 64)),
            spec("next_cache_0", (-1, 64, 2)), spec("hn", (1, 1, 32)), spec("output_ids", (-1, 8), "int64"),
            spec("mem_out", (1, 5))]
    assert detect(ins, outs) == [("state", "stateN"), ("recurrent", "next_recurrent"), ("cache_0", "next_cache_0"),
                                 ("h0", "hn")]  # not input_ids/output_ids (no state marker), not mem (shape)
