"""Small real models and signed bundles for serving tests: ONNX graphs with any dtype (onnx.helper),
a stateful TFLite model (resource variables), and a bundle writer with a golden set run in the real
runtime. Bundles are written by ``agent.bundle.write_bundle`` and signed with the test key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import write_bundle
from agent.runtime import load_model

ONNX_TYPES = {"float32": 1, "uint8": 2, "int8": 3, "int32": 6, "int64": 7, "bool": 9, "float16": 10}


def onnx_model(nodes: list, inputs: list[tuple[str, str, list]], outputs: list[tuple[str, str, list]],
               initializers: list | None = None) -> bytes:
    from onnx import helper

    vi = lambda n, t, s: helper.make_tensor_value_info(n, ONNX_TYPES[t], [None if d < 0 else d for d in s])  # noqa
    g = helper.make_graph(nodes, "g", [vi(*i) for i in inputs], [vi(*o) for o in outputs],
                          initializer=initializers or [])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def dtype_model() -> tuple[bytes, dict[str, np.ndarray]]:
    """INT64, BOOL and UINT8 inputs; INT64, INT32, UINT8 and FP32 outputs; and golden inputs for it."""
    from onnx import TensorProto, helper

    two = helper.make_tensor("two", TensorProto.INT64, [], [2])
    nodes = [helper.make_node("Mul", ["ids", "two"], ["ids2"]),
             helper.make_node("Cast", ["ids"], ["ids32"], to=TensorProto.INT32),
             helper.make_node("Identity", ["pix"], ["pix_out"]),
             helper.make_node("Cast", ["pix"], ["pixf"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["pixf", "maskf"], ["score"])]
    model = onnx_model(nodes, [("ids", "int64", [-1, 3]), ("mask", "bool", [-1, 3]), ("pix", "uint8", [-1, 3])],
                       [("ids2", "int64", [-1, 3]), ("ids32", "int32", [-1, 3]), ("pix_out", "uint8", [-1, 3]),
                        ("score", "float32", [-1, 3])], [two])
    x = {"ids": np.array([[1, -2, 3_000_000_000]], np.int64), "mask": np.array([[True, False, True]]),
         "pix": np.array([[0, 7, 255]], np.uint8)}
    return model, x


def log_model() -> tuple[bytes, dict[str, np.ndarray]]:
    """y = log(x): NaN for negative inputs (a model that misbehaves on some inputs)."""
    from onnx import helper

    model = onnx_model([helper.make_node("Log", ["x"], ["y"])], [("x", "float32", [-1, 4])],
                       [("y", "float32", [-1, 4])])
    return model, {"x": np.array([[1, 2, 3, 4]], np.float32)}


def state_io_model() -> tuple[bytes, dict[str, np.ndarray]]:
    """A streaming model with explicit state: total = h_in + x, returned as y and as the next state."""
    from onnx import helper

    nodes = [helper.make_node("Add", ["h_in", "x"], ["y"]), helper.make_node("Identity", ["y"], ["h_out"])]
    model = onnx_model(nodes, [("x", "float32", [1, 4]), ("h_in", "float32", [1, 4])],
                       [("y", "float32", [1, 4]), ("h_out", "float32", [1, 4])])
    return model, {"x": np.ones((1, 4), np.float32), "h_in": np.zeros((1, 4), np.float32)}


def counter_tflite() -> tuple[bytes, dict[str, np.ndarray]]:
    """A TFLite model with a resource variable: every call adds x to its running total."""
    from toolkit.tfenv import import_tf

    tf = import_tf()

    class Counter(tf.Module):
        def __init__(self):
            self.v = tf.Variable(tf.zeros([1, 4]))

        @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32, name="x")])
        def __call__(self, x):
            self.v.assign_add(x)
            return {"total": self.v + 0.0}

    m = Counter()
    conv = tf.lite.TFLiteConverter.from_concrete_functions([m.__call__.get_concrete_function()], m)
    conv.experimental_enable_resource_variables = True
    return conv.convert(), {"x": np.ones((1, 4), np.float32)}


def make_bundle(dst: Path, key: Any, model: bytes, golden_in: dict[str, np.ndarray], *, fmt: str = "onnx",
                name: str = "tiny", version: int = 1, arch: str = "x86_64", **extra: Any) -> Path:
    """A signed bundle whose tensor specs and golden outputs come from running the model in its runtime."""
    import io

    model_file = f"model.{fmt}"
    tmp = dst.with_suffix(f".{fmt}")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(model)
    m = load_model(tmp)
    out = m.predict({k: golden_in[k] for k in (s.name for s in m.inputs)})
    buf = io.BytesIO()
    np.savez(buf, **{f"in.{k}": v for k, v in golden_in.items()}, **{f"out.{k}": v for k, v in out.items()})
    doc = {"name": name, "version": version, "profile": "test", "arch": arch, "format": fmt,
           "precision": "fp32", "model": {"path": model_file},
           "runtime": {"name": "onnxruntime" if fmt == "onnx" else "litert", "min_version": "1.0", "threads": 1},
           "inputs": [s.to_dict() for s in m.inputs], "outputs": [s.to_dict() for s in m.outputs],
           "golden": {"path": "golden.npz", "atol": 1e-5, "rtol": 1e-5}, **extra}
    write_bundle(dst, doc, {model_file: model, "golden.npz": buf.getvalue()}, key.sign, key.key_id)
    return dst


def serving_client(state_dir: Path, keyring: Any, arch: str, bundle: Path, **agent_kw: Any):
    """Install ``bundle`` in an Agent, serve it over HTTP in-process and yield (agent, tritonclient);
    a generator for module fixtures (``yield from serving_client(...)``)."""
    import tritonclient.http as httpclient

    from agent.serve.http import make_server, serve_in_thread
    from agent.serve.service import Agent

    agent = Agent(state_dir, keyring, arch, **agent_kw)
    agent.start()
    assert agent.install(bundle).ok
    server = make_server(agent, "127.0.0.1", 0)
    serve_in_thread(server)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.server_address[1]}")
    yield agent, client
    client.close()
    server.shutdown()
    server.server_close()
