"""The published Open Inference Protocol v2 client (tritonclient[http]) with its default settings against
a running agent: binary tensor data both ways, true datatypes, metadata, config, classification.

Serving cases are parametrized (TFLite and ONNX bundles of the digits model, an ONNX model with INT64,
BOOL and UINT8 inputs); a model corpus can be appended to ``CASES`` as (bundle fixture, arch) pairs.
"""

from __future__ import annotations

import numpy as np
import pytest

from modelkit import dtype_model, make_bundle, serving_client

httpclient = pytest.importorskip("tritonclient.http")
np_to_triton_dtype = pytest.importorskip("tritonclient.utils").np_to_triton_dtype


def _digits(digits_build, profile):
    return next(p.bundle for p in digits_build.profiles if p.profile.name == profile)


@pytest.fixture(scope="module")
def bundles(digits_build, signing_key, tmp_path_factory):
    d = tmp_path_factory.mktemp("v2b")
    model, _ = dtype_model()
    _, golden = dtype_model()
    return {"digits-tflite": (_digits(digits_build, "rpi4-arm64"), "aarch64"),
            "digits-onnx": (_digits(digits_build, "x86_64-onnx"), "x86_64"),
            "dtypes-onnx": (make_bundle(d / "dtypes.bundle", signing_key, model, golden, name="dtypes"), "x86_64")}


CASES = ["digits-tflite", "digits-onnx", "dtypes-onnx"]


@pytest.fixture(scope="module", params=CASES)
def served(request, bundles, keyring, tmp_path_factory):
    bundle, arch = bundles[request.param]
    yield from serving_client(tmp_path_factory.mktemp("v2") / "state", keyring, arch, bundle, interpreters=2)


def sample(spec, rng):
    shape = [2 if d < 0 else d for d in spec.shape]
    dt = np.dtype(spec.dtype)
    if spec.quantized or dt.kind == "f":
        return rng.random(shape).astype(np.float32)
    if dt.kind == "b":
        return rng.random(shape) > 0.5
    info = np.iinfo(dt)
    return rng.integers(max(info.min, -1000), min(info.max, 1000), shape, endpoint=True).astype(dt)


def test_server_and_model_metadata(served):
    agent, client = served
    m = agent.current.manifest
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(m.name) and client.is_model_ready(m.name, str(m.version))
    assert not client.is_model_ready(m.name, str(m.version + 1))
    ext = client.get_server_metadata()["extensions"]
    assert {"binary_tensor_data", "model_configuration", "sequence", "parameters", "classification"} <= set(ext)
    meta = client.get_model_metadata(m.name)
    assert meta["versions"] == [str(m.version)]
    want = {s.name: ("FP32" if s.quantized else {"float32": "FP32", "int64": "INT64", "bool": "BOOL",
                                                "uint8": "UINT8", "int32": "INT32"}[s.dtype])
            for s in agent.current.model.inputs + agent.current.model.outputs}
    got = {t["name"]: t["datatype"] for t in meta["inputs"] + meta["outputs"]}
    assert got == want
    cfg = client.get_model_config(m.name)
    assert cfg["name"] == m.name and cfg["instance_group"][0]["count"] == 2
    assert [i["data_type"] for i in cfg["input"]] == [f"TYPE_{want[s.name]}" for s in agent.current.model.inputs]


@pytest.mark.parametrize("requested", ["none", "binary", "json"])
def test_infer_with_default_client_settings(served, requested):
    """set_data_from_numpy sends binary data; outputs come back binary (or JSON) with their own dtype."""
    agent, client = served
    cur = agent.current
    rng = np.random.default_rng(1)
    feed = {s.name: sample(s, rng) for s in cur.model.inputs}
    inputs = []
    for s in cur.model.inputs:
        a = feed[s.name]
        inp = httpclient.InferInput(s.name, list(a.shape), {"float32": "FP32", "int64": "INT64", "bool": "BOOL",
                                                             "uint8": "UINT8"}[a.dtype.name])
        inputs.append(inp.set_data_from_numpy(a))
    outputs = None if requested == "none" else [
        httpclient.InferRequestedOutput(s.name, binary_data=requested == "binary") for s in cur.model.outputs]
    res = client.infer(cur.manifest.name, inputs, outputs=outputs, request_id="r-7")
    assert res.get_response()["id"] == "r-7"
    assert res.get_response()["model_version"] == str(cur.manifest.version)
    want = agent.predict(feed)
    for s in cur.model.outputs:
        got = res.as_numpy(s.name)
        assert got.dtype == (np.float32 if s.quantized else np.dtype(s.dtype)), s
        np.testing.assert_allclose(got, want[s.name], rtol=1e-6)


def test_classification_extension(served):
    """class_count on the first float output with at least 3 values a sample: the top 3 as "score:index" (and
    ":label" where the bundle has labels), in the order of the scores the Python API gives."""
    agent, client = served
    cur = agent.current
    rng = np.random.default_rng(2)
    feed = {s.name: sample(s, rng) for s in cur.model.inputs}
    inputs = [httpclient.InferInput(n, list(a.shape), np_to_triton_dtype(a.dtype)).set_data_from_numpy(a)
              for n, a in feed.items()]
    want = agent.predict(feed)
    name = next(n for n, a in want.items() if a.dtype.kind == "f" and a[0].size >= 3)
    out = httpclient.InferRequestedOutput(name, class_count=3)
    res = client.infer(cur.manifest.name, inputs, outputs=[out]).as_numpy(name)
    assert res.shape == (2, 3)
    top = [int(s.split(b":")[1]) for s in res[0]]
    assert top == list(np.argsort(-want[name][0].ravel(), kind="stable")[:3])
    if cur.manifest.labels:  # "score:index:label"
        assert res[0][0].split(b":")[2].decode() == cur.manifest.labels[top[0]]
    else:  # "score:index" (Triton's format without a label file)
        assert all(len(s.split(b":")) == 2 for s in res[0])


def test_inference_statistics(served):
    """Triton's statistics extension, as tritonclient reads it: counts and times per version."""
    agent, client = served
    cur = agent.current
    feed = {s.name: sample(s, np.random.default_rng(3)) for s in cur.model.inputs}
    before = client.get_inference_statistics(cur.manifest.name)["model_stats"]
    n0 = before[0]["inference_count"] if before else 0
    client.infer(cur.manifest.name, [httpclient.InferInput(n, list(a.shape), np_to_triton_dtype(a.dtype))
                                     .set_data_from_numpy(a) for n, a in feed.items()])
    (st,) = client.get_inference_statistics(cur.manifest.name, str(cur.manifest.version))["model_stats"]
    assert st["name"] == cur.manifest.name and st["version"] == str(cur.manifest.version)
    assert st["inference_count"] == n0 + 1 and st["inference_stats"]["success"]["count"] == n0 + 1
    assert st["inference_stats"]["success"]["ns"] > 0 and st["last_inference"] > 0
    assert any(m["name"] == cur.manifest.name for m in client.get_inference_statistics()["model_stats"])


def test_errors_reach_the_client_as_messages(served):
    agent, client = served
    from tritonclient.utils import InferenceServerException

    cur = agent.current
    s = cur.model.inputs[0]
    a = np.zeros([1 if d < 0 else d for d in s.shape], np.float64)  # FP64: not the model's datatype
    inp = httpclient.InferInput(s.name, list(a.shape), "FP64").set_data_from_numpy(a)
    with pytest.raises(InferenceServerException, match="does not match the model's"):
        client.infer(cur.manifest.name, [inp])
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("no-such-model")


def test_bool_and_fp16_outputs_decode_in_the_client(served):
    """Outputs a bundle cannot carry yet (the golden replay compares numbers): the codec, read back by
    tritonclient's own response parser, binary and JSON."""
    from agent.manifest import TensorSpec
    from agent.serve import v2

    agent, _ = served
    outs = (TensorSpec("flag", "bool", (-1, 2)), TensorSpec("half", "float16", (-1, 2)))
    values = {"flag": np.array([[True, False]]), "half": np.array([[0.5, -2.0]], np.float32)}
    for binary in (True, False):
        req = v2.InferRequest("q", {}, tuple(v2.Wanted(s.name, binary) for s in outs), None)
        head, parts = v2.encode_infer(agent.current.manifest, outs, req, values)
        body = head + b"".join(bytes(p) for p in parts)
        res = httpclient.InferResult.from_response_body(body, header_length=len(head) if parts else None)
        assert res.as_numpy("flag").tolist() == [[True, False]] and res.as_numpy("flag").dtype == bool
        assert res.as_numpy("half").dtype == np.float16 and res.as_numpy("half").tolist() == [[0.5, -2.0]]
