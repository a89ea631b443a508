"""The validation gate refuses what breaks accuracy; selective quantization repairs it."""

from __future__ import annotations

import pytest

from toolkit.build.pipeline import build
from toolkit.errors import BuildFailed


@pytest.fixture(scope="module")
def outlier_build(tmp_path_factory, make_options, digits_outlier):
    out = tmp_path_factory.mktemp("outlier")
    return build(make_options(out, ["rpi4-arm64"], paths=digits_outlier, version=1, variant="int8-selective"))


def test_gate_refuses_broken_int8(outlier_build):
    p = outlier_build.profiles[0]
    int8 = next(v for v in p.variants if v.precision == "int8")
    assert not int8.passed
    assert int8.metrics["accuracy_drop_points"] > 20
    assert any(r.startswith("accuracy drop") for r in int8.reasons)
    fp32 = next(v for v in p.variants if v.precision == "fp32")
    assert fp32.passed and fp32.metrics["accuracy_drop_points"] == 0


def test_selective_quantization_recovers(outlier_build, keyring):
    from agent.bundle import verify_bundle

    p = outlier_build.profiles[0]
    sel = next(v for v in p.variants if v.precision == "int8-selective")
    assert sel.passed, sel.reasons
    assert sel.metrics["accuracy_drop_points"] <= 1.0
    assert sel.float_layers and any("hidden" in name for name in sel.float_layers)
    assert any("kept" in n and "in float" in n for n in sel.notes)
    assert p.chosen is sel
    m = verify_bundle(p.bundle, keyring)
    assert m.precision == "int8-selective" and m.data["model"]["float_layers"] == sel.float_layers


def test_no_bundle_when_nothing_passes(make_options, digits_outlier, tmp_path):
    """Coral accepts only full int8 and cannot keep layers in float: the build must refuse."""
    out = tmp_path / "dist"
    with pytest.raises(BuildFailed) as exc:
        build(make_options(out, ["coral-edgetpu"], paths=digits_outlier, version=1))
    msg = str(exc.value)
    assert "no bundle for 1 of 1 profile(s) (coral-edgetpu: no variant passed the validation gate " \
           "(tflite-runtime/int8: accuracy drop" in msg
    assert not exc.value.partial and exc.value.exit_code == 1
    assert "int8" in msg and "accuracy drop" in msg
    assert not list(out.glob("*.bundle"))
    assert any("not possible on the Edge TPU" in n for n in exc.value.result.profiles[0].notes)


def test_budget_failures_are_reported(make_options, tmp_path, profile):
    import dataclasses

    tight = dataclasses.replace(profile("rpi4-arm64"), max_model_mb=0.001)
    opts = make_options(tmp_path, [], version=1)
    opts.profiles = [tight]
    with pytest.raises(BuildFailed) as exc:
        build(opts)
    for v in exc.value.result.profiles[0].variants:
        assert any(r.startswith("size ") and "> 0.001 MB" in r for r in v.reasons)


def test_latency_budget_gate_and_choice_logic(profile):
    """Pure gate logic with given measurements (no timing in tests)."""
    from toolkit.build.gate import VariantResult, choose, gate
    from toolkit.build.measure import LatencyConfig

    rpi4 = profile("rpi4-arm64")  # p95 budget 150 ms, device slowdown x5
    cfg = LatencyConfig()
    fast = gate(VariantResult("rpi4-arm64", "int8", None, size_bytes=10, metrics={"accuracy_drop_points": 0.2},
                              latency={"p50_ms": 3.0, "p95_ms": 4.0, "peak_rss_mb": 60}), rpi4, cfg)
    slow = gate(VariantResult("rpi4-arm64", "fp32", None, size_bytes=40, metrics={"accuracy_drop_points": 0.0},
                              latency={"p50_ms": 29.0, "p95_ms": 31.0, "peak_rss_mb": 80}), rpi4, cfg)
    dyn = gate(VariantResult("rpi4-arm64", "dynamic-int8", None, size_bytes=10,
                             metrics={"accuracy_drop_points": 0.1},
                             latency={"p50_ms": 6.0, "p95_ms": 7.0, "peak_rss_mb": 60}), rpi4, cfg)
    assert fast.passed and dyn.passed
    assert slow.reasons == ["est. device p95 155.0 ms > 150 ms (host 31.00 ms x5)"]
    assert choose([slow, dyn, fast], rpi4) is fast  # fastest measured, not a fixed order
    for v in (slow, dyn, fast):
        v.chosen = False
    slow.passed, slow.latency["p50_ms"] = True, 2.0  # fp32 fastest by a clear margin: it wins
    assert choose([slow, dyn, fast], rpi4) is slow
    slow.chosen, slow.latency["p50_ms"] = False, 2.95  # within 5% of int8: a tie, preference (int8) decides
    assert choose([slow, dyn, fast], rpi4) is fast
    rpi3 = profile("rpi3-armv7")  # objective: size, ties broken by preference order
    a = VariantResult("rpi3-armv7", "fp16", None, size_bytes=10, passed=True, latency={"p50_ms": 1})
    b = VariantResult("rpi3-armv7", "int8", None, size_bytes=10, passed=True, latency={"p50_ms": 2})
    assert choose([a, b], rpi3) is b
    nan = gate(VariantResult("rpi4-arm64", "fp16", None, metrics={"finite": False}), rpi4, cfg)
    assert "outputs contain NaN/Inf" in nan.reasons


def test_integer_outputs_are_compared_exactly(profile):
    """Class ids or token ids from a variant must equal the reference's; float outputs still give SNR."""
    import numpy as np

    from toolkit.build.gate import VariantResult, gate
    from toolkit.build.measure import LatencyConfig, compare

    ref = [np.arange(100, dtype=np.uint8).reshape(10, 10), np.linspace(0, 1, 30, dtype=np.float32).reshape(10, 3, 1)]
    same = compare([ref[0].copy(), ref[1] + 1e-6], ref, None)
    assert same["int_agreement"] == 1.0 and same["snr_db"] > 60 and same["task"] == "regression"
    flipped = ref[0].copy()
    flipped[:, :2] += 1  # 20% of the ids change
    m = compare([flipped, ref[1]], ref, None)
    assert m["int_agreement"] == 0.8
    v = gate(VariantResult("x86_64-onnx", "int8", None, metrics=m, latency={}), profile("x86_64-onnx"), LatencyConfig())
    assert v.reasons == ["integer outputs agree on 0.800 of values < 0.97"]
    only_ints = compare([ref[0]], [ref[0]], None)
    assert only_ints == {"finite": True, "int_agreement": 1.0, "task": "integer"}
