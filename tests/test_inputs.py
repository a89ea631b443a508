"""Ingest of every source format, and bad input refused with a clear message and nothing written."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.build.pipeline import build
from toolkit.errors import BuildFailed, ConversionError, InputError, ProfileError


def _no_output(out):
    return not out.exists() or not list(out.glob("*.bundle"))


def test_corrupt_model_file(make_options, tmp_path):
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"PK\x03\x04 not really a keras zip")
    out = tmp_path / "dist"
    with pytest.raises(InputError, match=r"broken.keras: cannot load as keras model"):
        build(make_options(out, ["rpi4-arm64"], model=bad))
    assert _no_output(out)


@pytest.mark.parametrize("suffix, content, match", [
    (".pt", b"torch", "unsupported model format '.pt'"),
    (".onnx", b"garbage", "cannot load as onnx model"),
    (".tflite", b"garbage", "cannot load as tflite model"),
])
def test_unreadable_or_unknown_formats(make_options, tmp_path, suffix, content, match):
    f = tmp_path / f"m{suffix}"
    f.write_bytes(content)
    with pytest.raises(InputError, match=match):
        build(make_options(tmp_path / "dist", ["rpi4-arm64"], model=f))
    assert _no_output(tmp_path / "dist")


@pytest.mark.parametrize("arrays, match", [
    ({"image": np.zeros((10, 8, 8), np.float32)}, r"array 'image' has shape \(10, 8, 8\); model input 'image' expects \(N, 8, 8, 1\)"),
    ({"image": np.zeros((10, 64), np.float32)}, r"expects \(N, 8, 8, 1\)"),
    ({"image": np.array([["a"] * 1] * 10)}, r"has dtype <U1; expected numbers"),
    ({"pixels": np.zeros((10, 8, 8, 1), np.float32)}, r"named \['image'\] \(or x\); found \['pixels'\]"),
    ({"image": np.full((10, 8, 8, 1), np.nan, np.float32)}, r"contains NaN or Inf"),
    ({"image": np.zeros((0, 8, 8, 1), np.float32)}, r"is empty"),
])
def test_wrong_calibration_data(make_options, tmp_path, arrays, match):
    calib = tmp_path / "calib.npz"
    np.savez(calib, **arrays)
    out = tmp_path / "dist"
    with pytest.raises(InputError, match=match) as exc:
        build(make_options(out, ["rpi4-arm64"], calibration=calib))
    assert "calibration data" in str(exc.value) and str(calib) in str(exc.value)
    assert _no_output(out)


def test_labels_must_match(make_options, tmp_path, digits):
    val = tmp_path / "val.npz"
    np.savez(val, image=np.zeros((5, 8, 8, 1), np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(InputError, match="labels 'y' must be integer class ids, one per sample"):
        build(make_options(tmp_path / "d", ["rpi4-arm64"], validation=val))
    notnpz = tmp_path / "val2.npz"
    notnpz.write_text("hello")
    with pytest.raises(InputError, match="not a readable .npz"):
        build(make_options(tmp_path / "d", ["rpi4-arm64"], validation=notnpz))


def test_unknown_and_impossible_profiles(make_options, tmp_path):
    with pytest.raises(ProfileError, match="unknown device profile"):
        make_options(tmp_path, ["rpi9-quantum"])
    from toolkit.profiles import load_profile_file

    bad = tmp_path / "pi3-litert.toml"
    bad.write_text('name = "pi3-litert"\n[device]\narch = "armv7l"\n[runtime]\nname = "litert"\n'
                   'version = "2.3.0"\nthreads = 4\n[precision]\naccepted = ["int8"]\n'
                   '[budgets]\nmodel_mb = 1\nram_mb = 1\np95_latency_ms = 1\n')
    with pytest.raises(ProfileError, match="litert has no wheels for armv7l"):
        load_profile_file(bad)


def test_onnx_source_and_quantization(make_options, tmp_path, digits):
    """An ONNX model (made by tf2onnx here) builds for an ONNX profile with real QDQ int8, and for a
    Raspberry Pi through its ONNX Runtime; the Pi 3 (tflite-runtime only) refuses it on its own."""
    import onnx

    from toolkit.build.convert_onnx import to_onnx
    from toolkit.build.ingest import load_source

    path = tmp_path / "digits.onnx"
    onnx.save(to_onnx(load_source(digits["model"]), 17), str(path))
    with pytest.raises(BuildFailed) as exc:
        build(make_options(tmp_path / "dist", ["x86_64-onnx", "rpi5-arm64", "rpi3-armv7"], model=path, version=1))
    by = {p.profile.name: p for p in exc.value.result.profiles}
    for name in ("x86_64-onnx", "rpi5-arm64"):
        p = by[name]
        assert p.bundle is not None and p.chosen.runtime == "onnxruntime"
        int8 = next(v for v in p.variants if v.precision == "int8")
        assert int8.passed and int8.metrics["accuracy_drop_points"] <= 1.0
    assert by["rpi3-armv7"].refused.startswith("rpi3-armv7 has no ONNX Runtime (tflite-runtime 2.14.0)")


def _constant_weight_model(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(64, 10)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(size=(10,)).astype(np.float32), "b")
    nodes = [helper.make_node("Constant", [], ["W"], value=w), helper.make_node("Constant", [], ["B"], value=b),
             helper.make_node("Reshape", ["x", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "W"], ["mm"]), helper.make_node("Add", ["mm", "B"], ["y"])]
    shape = numpy_helper.from_array(np.array([-1, 64], np.int64), "shape")
    g = helper.make_graph(nodes, "constw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8, 8, 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10])], [shape])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_onnx_constant_node_weights_are_quantized(tmp_path, digits):
    import onnx

    from toolkit.build.convert_onnx import quant_op_count, quantize

    path = tmp_path / "constw.onnx"
    _constant_weight_model(path)
    calib = [np.load(digits["calibration"])["image"]]
    for precision in ("int8", "dynamic-int8"):
        q, _ = quantize(onnx.load(str(path)), precision, calib, ["x"], "batch", 17)
        assert quant_op_count(q) > 0
        assert not [n for n in q.graph.node if n.op_type == "Constant" and n.output[0] == "W"]


def test_onnx_nothing_to_quantize_is_refused(tmp_path):
    from onnx import TensorProto, helper

    from toolkit.build.convert_onnx import quantize

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ConversionError, match="refusing to output an unquantized 'int8' model"):
        quantize(m, "dynamic-int8", None, ["x"], "batch", 17)


def test_tflite_source_bundled_as_is(make_options, tmp_path, digits_build):
    """A .tflite is its own reference: the table says so instead of showing a measured fidelity."""
    src = next(v for p in digits_build.profiles for v in p.variants
               if p.profile.name == "rpi4-arm64" and v.precision == "int8" and v.runtime == "litert").file
    with pytest.raises(BuildFailed) as exc:
        build(make_options(tmp_path / "dist", ["rpi4-arm64", "x86_64-onnx"], model=src, version=1,
                           name="digits-tfl"))
    r = exc.value.result
    p = r.profiles[0]
    assert [(v.runtime, v.precision) for v in p.variants] == [("litert", "as-is")] and p.chosen.passed
    assert p.bundle is not None and "re-quantization is not possible" in p.variants[0].notes[0]
    assert any("the reference is the .tflite file itself: its fidelity is 1 by construction" in n for n in p.notes)
    row = next(line for line in r.table().splitlines() if line.startswith("rpi4-arm64"))
    assert "1 (self)" in row and "the reference is this .tflite file itself: fidelity 1 by construction" in row
    assert "REFUSED: a .tflite model is bundled as it is, for TFLite runtimes only" in r.table()


def test_savedmodel_source(make_options, tmp_path, digits):
    from toolkit.tfenv import import_keras, import_tf

    tf = import_tf()
    model = import_keras().models.load_model(digits["model"])
    sm = tmp_path / "saved"
    tf.saved_model.save(model, str(sm))
    r = build(make_options(tmp_path / "dist", ["rpi4-arm64", "x86_64-onnx"], model=sm, version=1))
    for p in r.profiles:
        assert p.bundle is not None
        for v in p.variants:
            assert v.passed, (p.profile.name, v.precision, v.reasons)


def test_multi_input_multi_output(make_options, tmp_path):
    """Two inputs, two outputs: names are kept and each output is compared to its own reference."""
    from toolkit.tfenv import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(1)
    a = keras.Input((6,), name="a")
    b = keras.Input((4,), name="b")
    h = keras.layers.Dense(16, activation="relu", name="h")(keras.layers.Concatenate()([a, b]))
    cls = keras.layers.Dense(3, activation="softmax", name="cls")(h)
    reg = keras.layers.Dense(1, name="reg")(h)
    model = keras.Model([a, b], [cls, reg])
    path = tmp_path / "multi.keras"
    model.save(path)
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, a=rng.random((64, 6), np.float32), b=rng.random((64, 4), np.float32))
    r = build(make_options(tmp_path / "dist", ["rpi4-arm64", "x86_64-onnx"], model=path, version=1,
                           validation=data, calibration=data, meta={}, keep_variants=tmp_path / "v"))
    from agent.runtime import load_model

    for p in r.profiles:
        fp32 = next(v for v in p.variants if v.precision == "fp32")
        assert fp32.metrics["max_abs_error"] < 1e-4, (p.profile.name, fp32.metrics)
        m = load_model(fp32.file)
        assert [s.name for s in m.inputs] == ["a", "b"]
        assert {s.name for s in m.outputs} == {"cls", "reg"}
        assert p.bundle is not None
