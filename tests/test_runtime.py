"""agent.runtime: float I/O over quantized tensors, stateful models, clear runtime errors."""

from __future__ import annotations

import numpy as np
import pytest

from agent.errors import InputError, ModelError, RuntimeMissingError
from agent.manifest import TensorSpec
from agent.runtime import dequantize, load_model, quantize, tflite_interpreter_class


def test_quantize_roundtrip_and_saturation():
    spec = TensorSpec("x", "int8", (-1, 3), 0.5, -10)
    q = quantize(np.array([[0.0, 1.0, 1000.0]]), spec)
    assert q.dtype == np.int8 and q.tolist() == [[-10, -8, 127]]
    np.testing.assert_allclose(dequantize(q, spec), [[0.0, 1.0, 68.5]])
    u = TensorSpec("x", "uint8", (-1, 1), 1 / 255, 0)
    assert quantize(np.array([[-1.0], [0.5], [2.0]]), u).ravel().tolist() == [0, 128, 255]


def test_stateful_model_keeps_its_variables(tmp_path):
    """A TFLite model with resource variables: state persists across calls, and a clone starts fresh."""
    from modelkit import counter_tflite

    path = tmp_path / "counter.tflite"
    path.write_bytes(counter_tflite()[0])
    model = load_model(path)
    totals = [model.predict(np.ones((1, 4), np.float32))["total"][0, 0] for _ in range(3)]
    assert totals == [1.0, 2.0, 3.0]
    assert model.stateful and model.clone().predict(np.ones((1, 4), np.float32))["total"][0, 0] == 1.0


def test_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="model file not found"):
        load_model(tmp_path / "none.tflite")
    (tmp_path / "m.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="unknown model format"):
        load_model(tmp_path / "m.bin")
    (tmp_path / "bad.tflite").write_bytes(b"not a flatbuffer")
    with pytest.raises(ModelError, match="could not load the model"):
        load_model(tmp_path / "bad.tflite")


def test_missing_runtime_names_what_to_install(monkeypatch):
    import agent.runtime as rt

    monkeypatch.setattr(rt, "TFLITE_RUNTIMES", (("litert", "no_such_module_xyz", "pip install ai-edge-litert"),))
    with pytest.raises(RuntimeMissingError, match="pip install ai-edge-litert"):
        tflite_interpreter_class()


def test_input_checks(digits_build):
    v = next(x for p in digits_build.profiles for x in p.variants
             if p.profile.name == "rpi4-arm64" and x.precision == "int8")
    m = load_model(v.file)
    one = np.zeros((8, 8, 1), np.float32)
    assert m.predict(one)["probs"].shape == (1, 10)  # a single sample gets its batch dimension
    assert m.predict({"image": np.stack([one] * 5)})["probs"].shape == (5, 10)
    with pytest.raises(InputError, match=r"expected shape \(N, 8, 8, 1\), got \(2, 64\)"):
        m.predict(np.zeros((2, 64)))
    with pytest.raises(InputError, match="missing \\['image'\\], unknown \\['img'\\]"):
        m.predict({"img": one})
    with pytest.raises(InputError, match="not a numeric array"):
        m.predict([["a", "b"]])
