"""Build details an outside check tripped over: fp16 of a model with constants beyond fp16's range, rough
`--quick` timings that must not refuse a model, raw quantized integers in data files, unused --meta keys,
and a partial build's short error."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from toolkit.build.gate import VariantResult, gate
from toolkit.build.measure import LatencyConfig


def test_fp16_keeps_nodes_that_read_constants_beyond_fp16_in_fp32():
    """A BatchNorm variance of 9.79e7 (PP-OCR's det model): clipped to 65504 the fp16 model answers noise."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from toolkit.build.convert_onnx import fp32_nodes, to_fp16

    c = 4
    inits = [numpy_helper.from_array(np.ones(c, np.float32), "s"), numpy_helper.from_array(np.zeros(c, np.float32), "b"),
             numpy_helper.from_array(np.full(c, 5000.0, np.float32), "m"),
             numpy_helper.from_array(np.full(c, 9.79e7, np.float32), "v")]
    g = helper.make_graph([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"]),
                           helper.make_node("Relu", ["y"], ["z"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 8, 8])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
    assert len(fp32_nodes(onnx.ModelProto.FromString(model.SerializeToString()))) == 1  # the BatchNorm only
    x = np.random.default_rng(0).normal(5000, 1000, (1, c, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    got = ort.InferenceSession(to_fp16(model).SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max())


def test_quick_timings_report_the_latency_budget_without_enforcing_it(profile):
    p = profile("rpi4-arm64")
    slow = {"p50_ms": 500.0, "p95_ms": 900.0}
    strict = gate(VariantResult(p.name, "fp32", None, latency=dict(slow)), p, LatencyConfig())
    assert not strict.passed and "est. device p95" in strict.reasons[0]
    quick = gate(VariantResult(p.name, "fp32", None, latency=dict(slow)), p, LatencyConfig(gate=False))
    assert quick.passed and any("not enforced" in n for n in quick.notes), quick.notes


def test_data_in_a_quantized_inputs_own_integer_dtype_is_raw_quantized_values(tmp_path):
    from toolkit.build.data import load_dataset
    from toolkit.build.ingest import IOSpec

    spec = IOSpec("features", (1, 3), "float32", quant=(0.5, -128, "int8"))
    np.savez(tmp_path / "d.npz", features=np.array([[-128, -126, 0]], np.int8))  # batch layout: (N, 3)
    np.savez(tmp_path / "f.npz", features=np.array([[-128, -126, 0]], np.float32))
    assert load_dataset(tmp_path / "d.npz", [spec], "validation").inputs[0].tolist() == [[0.0, 1.0, 64.0]]
    assert load_dataset(tmp_path / "f.npz", [spec], "validation").inputs[0].tolist() == [[-128.0, -126.0, 0.0]]


def test_partial_build_says_so_briefly_and_notes_unused_meta(tmp_path):
    """An ONNX model for a Pi 4 and a Pi 3: the Pi 3 is refused, the Pi 4 gets its bundle, exit code 3; the
    error line sums up (the table above says why) instead of repeating the whole table."""
    import json

    from tinymodels import vad, vad_data
    from toolkit.cli import cli

    model, data = vad(tmp_path / "vad.onnx"), vad_data(tmp_path / "d.npz")
    (tmp_path / "meta.json").write_text(json.dumps({"labels": [], "colour": "blue"}))
    res = CliRunner().invoke(cli, ["--home", str(tmp_path / "h"), "build", str(model), "-p", "rpi4-arm64", "-p",
                                   "rpi3-armv7", "--validation", str(data), "--quick", "--meta",
                                   str(tmp_path / "meta.json"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 3, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert errors == ["Error: no bundle for 1 of 2 profile(s): rpi3-armv7 (see above)"], errors
    assert res.output.count("REFUSED: rpi3-armv7 has no ONNX Runtime") == 1
    assert "--meta keys ['colour'] are not used" in res.output
    assert list((tmp_path / "o").glob("vad-v1-rpi4-arm64.bundle"))


def test_full_int8_of_a_keras_model_with_two_inputs_calibrates_each_input(tmp_path):
    """The converter orders a Keras model's inputs its own way ([tab, image] here): calibration samples go by
    input name, not by position, or int8 fails (a conv fed the vector) or, with equal ranks, silently
    calibrates each input with the other's ranges."""
    from toolkit.build.convert_tflite import convert
    from toolkit.build.ingest import load_source
    from toolkit.tfenv import import_keras

    keras = import_keras()
    image = keras.Input((8, 8, 1), name="image")
    tab = keras.Input((4,), name="tab")
    h = keras.layers.Flatten()(keras.layers.Conv2D(2, 3, activation="relu")(image))
    out = keras.layers.Dense(3, activation="softmax", name="probs")(keras.layers.Concatenate()([h, tab * 100.0]))
    keras.Model([image, tab], out).save(tmp_path / "twoin.keras")
    rng = np.random.default_rng(0)
    calib = [rng.random((16, 8, 8, 1), np.float32), rng.random((16, 4), np.float32) * 50]
    source = load_source(tmp_path / "twoin.keras")
    path = tmp_path / "int8.tflite"
    path.write_bytes(convert(source, "int8", calib, int8_io="float"))

    from agent.runtime import load_model

    m = load_model(path)
    got = m.predict({"image": calib[0][:4], "tab": calib[1][:4]})["probs"]
    want = keras.models.load_model(tmp_path / "twoin.keras").predict([calib[0][:4], calib[1][:4]], verbose=0)
    assert np.abs(got - want).max() < 0.1, (got, want)
    from toolkit.build.selective import rank_layers  # the selective repair feeds the debugger the same way

    assert rank_layers(source, calib)


def test_a_token_beyond_the_vocabulary_is_the_callers_error_said_once(tmp_path):
    """LiteRT's error reporter repeats every earlier message in the next one: each answer says only its own
    failure; an index out of bounds (a token id beyond the vocabulary) is a 400, as ONNX Runtime's is."""
    from agent.errors import InputError
    from agent.runtime import load_model
    from toolkit.build.convert_tflite import convert
    from toolkit.build.ingest import load_source
    from toolkit.tfenv import import_keras

    keras = import_keras()
    tokens = keras.Input((6,), dtype="int32", name="tokens")
    out = keras.layers.Dense(2, activation="softmax")(
        keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(50, 4)(tokens)))
    keras.Model(tokens, out).save(tmp_path / "text.keras")
    (tmp_path / "m.tflite").write_bytes(convert(load_source(tmp_path / "text.keras"), "fp32", None))
    m = load_model(tmp_path / "m.tflite")
    assert m.predict({"tokens": np.ones((1, 6), np.int32)})
    for _ in range(3):
        with pytest.raises(InputError) as exc:
            m.predict({"tokens": np.full((1, 6), 60, np.int32)})
        assert str(exc.value).count("out of bounds") == 1, exc.value
    assert m.predict({"tokens": np.ones((1, 6), np.int32)})  # and the interpreter still answers
