"""`edgeship build` end to end with the real libraries (TensorFlow, tfmot, tf2onnx, ORT, LiteRT)."""

from __future__ import annotations


import pytest

from agent.bundle import extract_bundle, verify_bundle
from agent.golden import replay
from agent.runtime import load_model
from toolkit.build.pipeline import build


def _variant(result, profile, precision):
    p = next(p for p in result.profiles if p.profile.name == profile)
    return next(v for v in p.variants if v.precision == precision)


def test_every_variant_loads_runs_and_passes(digits_build):
    for p in digits_build.profiles:
        assert {v.precision for v in p.variants} == set(p.profile.precisions)
        for v in p.variants:
            assert v.passed, (p.profile.name, v.precision, v.reasons)
            assert v.metrics["finite"] and v.latency["ok"] and v.latency["runs"] >= 5
            assert v.latency["p50_ms"] > 0 and v.latency["peak_rss_mb"] > 0
            assert v.size_bytes == v.file.stat().st_size if v.file.exists() else v.size_bytes > 0
        assert p.chosen is not None and p.bundle is not None and p.bundle.is_file()


def test_digits_int8_accuracy_drop_within_one_point(digits_build):
    for profile in ("rpi4-arm64", "rpi3-armv7", "x86_64-onnx"):
        v = _variant(digits_build, profile, "int8")
        assert v.metrics["reference_accuracy"] > 0.95
        assert v.metrics["accuracy_drop_points"] <= 1.0, v.metrics
        assert v.metrics["top1_agreement"] >= 0.97
    fp32 = _variant(digits_build, "rpi4-arm64", "fp32")
    assert _variant(digits_build, "rpi4-arm64", "int8").size_bytes < 0.5 * fp32.size_bytes


def test_int8_tflite_has_integer_io_and_onnx_int8_is_quantized(digits_build):
    tfl = load_model(_variant(digits_build, "rpi4-arm64", "int8").file)
    assert tfl.inputs[0].dtype == "int8" and tfl.inputs[0].quantized
    assert tfl.outputs[0].dtype == "int8"
    import onnx

    from toolkit.build.convert_onnx import quant_op_count

    q = onnx.load(str(_variant(digits_build, "x86_64-onnx", "int8").file))
    assert quant_op_count(q) > 0
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in q.graph.node}


def test_bundles_verify_and_replay_golden(digits_build, keyring, tmp_path):
    for p in digits_build.profiles:
        m = verify_bundle(p.bundle, keyring)
        assert (m.name, m.version, m.profile, m.precision) == ("digits", 1, p.profile.name, p.chosen.precision)
        assert m.labels == tuple(str(i) for i in range(10))
        assert m.data["provenance"]["source"]["kind"] == "keras"
        assert m.data["input_stats"][0]["name"] == "image"
        assert m.data["metrics"]["accuracy_drop_points"] <= 1.0
        folder = tmp_path / p.profile.name
        extract_bundle(p.bundle, keyring, folder)
        model = load_model(folder / m.model_file)
        assert replay(model, m, folder) <= m.golden["atol"]


def test_golden_replay_catches_a_different_model(digits_build, keyring, tmp_path):
    from agent.errors import ModelError

    rpi4 = next(p for p in digits_build.profiles if p.profile.name == "rpi4-arm64")
    folder = tmp_path / "b"
    m = extract_bundle(rpi4.bundle, keyring, folder)
    other = _variant(digits_build, "rpi4-arm64", "int8" if m.precision != "int8" else "fp16").file
    wrong = load_model(other)
    bad = m.golden | {"atol": 0.0, "rtol": 0.0}
    import dataclasses

    with pytest.raises(ModelError, match="differs from the golden set"):
        replay(wrong, dataclasses.replace(m, golden=bad), folder)


def test_reproducible_bundle(make_options, tmp_path):
    """Same inputs, same bytes: rpi3 (objective size) and jetson (preference) choose deterministically,
    and --variant pins the choice for latency-objective profiles."""
    profiles = ["rpi3-armv7", "jetson-orin-nano"]
    a = build(make_options(tmp_path / "a", profiles, version=7))
    b = build(make_options(tmp_path / "b", profiles, version=7))
    c = build(make_options(tmp_path / "c", ["rpi4-arm64"], version=7, variant="litert/int8"))
    d = build(make_options(tmp_path / "d", ["rpi4-arm64"], version=7, variant="litert/int8"))
    for x, y in zip(a.profiles + c.profiles, b.profiles + d.profiles):
        assert x.bundle.name == y.bundle.name
        assert x.bundle.read_bytes() == y.bundle.read_bytes(), x.bundle.name
    assert (c.profiles[0].chosen.runtime, c.profiles[0].chosen.precision) == ("litert", "int8")
    assert next(p for p in a.profiles if p.profile.name == "jetson-orin-nano").chosen.precision == "fp16"


def test_pi_profile_measures_both_runtimes_and_bundles_the_faster(digits_build, keyring):
    """rpi4-arm64 has LiteRT and ONNX Runtime: a Keras source gets both families, measured; the
    objective (latency) picks among all of them and the manifest says which runtime the bundle needs."""
    from toolkit.build.gate import choose

    p = next(p for p in digits_build.profiles if p.profile.name == "rpi4-arm64")
    by_runtime = {rt: {v.precision for v in p.variants if v.runtime == rt} for rt in ("litert", "onnxruntime")}
    assert by_runtime == {"litert": {"int8", "fp16", "fp32", "dynamic-int8"},
                          "onnxruntime": {"int8", "fp16", "fp32", "dynamic-int8"}}
    assert all(v.latency.get("p50_ms") for v in p.variants if v.passed)
    fastest = min(v.latency["p50_ms"] for v in p.variants if v.passed)
    assert p.chosen.latency["p50_ms"] <= fastest * 1.05
    for v in p.variants:
        v.chosen = False
    assert choose(p.variants, p.profile) is p.chosen  # the same choice over both families
    p.chosen.chosen = True
    m = verify_bundle(p.bundle, keyring)
    assert (m.runtime, m.format) == ({"litert": "litert", "onnxruntime": "onnxruntime"}[p.chosen.runtime],
                                     {"litert": "tflite", "onnxruntime": "onnx"}[p.chosen.runtime])
