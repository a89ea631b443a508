"""Small ONNX models written with onnx.helper (no TensorFlow): the shapes real published models have
and that the agent and the build must handle."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def vad(path: Path, opset: int = 17) -> Path:
    """A voice-activity-detector-shaped model: a float frame batch ``x`` [B, 4], a float state whose
    batch axis is not first ``state`` [2, B, 3], an int64 scalar sample rate ``sr``. Outputs: ``prob``
    [B, 1], ``new_state`` [2, B, 3] and an int64 class id ``cls`` [B]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "W")
    o = numpy_helper.from_array(rng.normal(size=(3, 1)).astype(np.float32), "O")
    k = numpy_helper.from_array(np.array(16000.0, np.float32), "K")
    zero = numpy_helper.from_array(np.array(0, np.int64), "zero")
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    nodes = [
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["srf", "K"], ["scale"]),
        helper.make_node("Mul", ["x", "scale"], ["xs"]),
        helper.make_node("MatMul", ["xs", "W"], ["h"]),
        helper.make_node("Gather", ["state", "zero"], ["s0"], axis=0),
        helper.make_node("Add", ["h", "s0"], ["hs"]),
        helper.make_node("Tanh", ["hs"], ["h2"]),
        helper.make_node("MatMul", ["h2", "O"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["prob"]),
        helper.make_node("Unsqueeze", ["h2", "axes"], ["h3"]),
        helper.make_node("Concat", ["h3", "h3"], ["new_state"], axis=0),
        helper.make_node("ArgMax", ["h2"], ["cls"], axis=1, keepdims=0),
    ]
    if opset < 13:  # Unsqueeze took its axes as an attribute before opset 13
        nodes[9] = helper.make_node("Unsqueeze", ["h2"], ["h3"], axes=[0])
    g = helper.make_graph(
        nodes, "vad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 3]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 1]),
         helper.make_tensor_value_info("new_state", TensorProto.FLOAT, [2, "batch", 3]),
         helper.make_tensor_value_info("cls", TensorProto.INT64, ["batch"])],
        [w, o, k, zero] + ([axes] if opset >= 13 else []))
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def vad_data(path: Path, n: int = 24, seed: int = 0) -> Path:
    """N samples in the stacked layout: x (N, 1, 4), state (N, 2, 1, 3), sr (N,)."""
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.normal(size=(n, 1, 4)).astype(np.float32),
             state=(rng.normal(size=(n, 2, 1, 3)) * 0.5).astype(np.float32),
             sr=np.full(n, 16000, np.int64))
    return path


def vad_reference(model_path: Path, x: np.ndarray, state: np.ndarray, sr: int) -> list[np.ndarray]:
    """The original model run directly in ONNX Runtime, one call."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x, "state": state, "sr": np.array(sr, np.int64)})


def conv_net(path: Path, opset: int = 11) -> Path:
    """Conv → Relu → Conv → GlobalAveragePool → Flatten → Gemm at an old opset (as old PyTorch exports
    are): per-channel QDQ of its Conv weights needs DequantizeLinear's ``axis`` (opset 13)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32) * 0.3, n) for n, s in
             (("w1", (8, 3, 3, 3)), ("b1", (8,)), ("w2", (8, 8, 3, 3)), ("b2", (8,)), ("wf", (8, 5)), ("bf", (5,)))]
    nodes = [helper.make_node("Conv", ["img", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"])]
    g = helper.make_graph(nodes, "convnet",
                          [helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 6
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def vad_savedmodel(path: Path) -> Path:
    """The same shapes as ``vad`` as a TensorFlow SavedModel (for the TFLite side): x [B, 64], state
    [2, B, 16], an int64 scalar sr; outputs prob [B, 1] and new_state [2, B, 16]."""
    from toolkit.tfenv import import_tf

    tf = import_tf()

    class VAD(tf.Module):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.w = tf.Variable(rng.normal(size=(64, 16)).astype(np.float32) * 0.2)
            self.u = tf.Variable(rng.normal(size=(16, 16)).astype(np.float32) * 0.2)
            self.o = tf.Variable(rng.normal(size=(16, 1)).astype(np.float32) * 0.5)

        @tf.function(input_signature=[tf.TensorSpec([None, 64], tf.float32, name="x"),
                                      tf.TensorSpec([2, None, 16], tf.float32, name="state"),
                                      tf.TensorSpec([], tf.int64, name="sr")])
        def __call__(self, x, state, sr):
            h = tf.tanh(x @ self.w * (tf.cast(sr, tf.float32) / 16000.0) + state[0] @ self.u)
            c = tf.tanh(h + state[1])
            return {"prob": tf.sigmoid(c @ self.o), "new_state": tf.stack([h, c])}

    m = VAD()
    tf.saved_model.save(m, str(path), signatures=m.__call__)
    return path
