"""Any input dtype and layout in the agent runtime: scalar and integer inputs, a state whose batch axis is
not first, integer outputs; the sample layout of agent.layout; golden replay of such a model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from agent.errors import InputError, ModelError
from agent.layout import BATCH, STACK, join, layout_of, samples
from agent.runtime import load_model
from tinymodels import vad, vad_reference


@pytest.fixture(scope="module")
def vad_onnx(tmp_path_factory):
    return vad(tmp_path_factory.mktemp("vad") / "vad.onnx")


def test_layout_rule():
    assert layout_of([(-1, 8, 8, 1)]) == BATCH
    assert layout_of([(1, 3, 480, 800)]) == BATCH  # an export at batch 1
    assert layout_of([(-1, -1), (-1,)]) == BATCH  # token ids + lengths
    assert layout_of([(-1, 4), (2, -1, 3), ()]) == STACK  # a scalar, a state [2, B, 3]
    assert layout_of([(1, 257, 1, 2), (2, 1, 16, 16, 33)]) == STACK  # leading 2 is not a batch
    a = np.arange(6).reshape(3, 2)
    assert [f[0].shape for f in samples([a], BATCH)] == [(1, 2)] * 3
    assert [f[0].shape for f in samples([a], STACK)] == [(2,)] * 3
    assert join([{"y": np.ones((1, 2))}] * 3, BATCH)["y"].shape == (3, 2)
    assert join([{"y": np.ones((1, 2))}] * 3, STACK)["y"].shape == (3, 1, 2)
    assert join([{"y": np.float32(1)}] * 3, BATCH)["y"].shape == (3,)


def test_scalar_int_input_and_state_not_batch_first(vad_onnx):
    """Once refused with 'expected shape (N, ), got (1,)' and 'all inputs must have the same batch size'."""
    m = load_model(vad_onnx)
    assert m.layout == STACK
    assert [s.dtype for s in m.inputs] == ["float32", "float32", "int64"]
    rng = np.random.default_rng(0)
    x, state = rng.normal(size=(1, 4)).astype(np.float32), rng.normal(size=(2, 1, 3)).astype(np.float32)
    one = m.predict({"x": x, "state": state, "sr": 16000})  # one call, exactly as the model takes it
    ref = vad_reference(vad_onnx, x, state, 16000)
    assert one["prob"].shape == (1, 1, 1) and one["new_state"].shape == (1, 2, 1, 3)
    np.testing.assert_allclose(one["prob"][0], ref[0], rtol=1e-6)
    np.testing.assert_allclose(one["new_state"][0], ref[1], rtol=1e-6)
    assert one["cls"].dtype == np.int64 and one["cls"][0].tolist() == ref[2].tolist()
    # N samples stacked on a new axis; each runs as its own call and may carry its own batch size
    xs = rng.normal(size=(5, 3, 4)).astype(np.float32)
    states = rng.normal(size=(5, 2, 3, 3)).astype(np.float32)
    srs = np.array([8000, 16000, 16000, 8000, 16000])
    out = m.predict({"x": xs, "state": states, "sr": srs})
    assert out["prob"].shape == (5, 3, 1) and out["cls"].shape == (5, 3)
    for i in range(5):
        r = vad_reference(vad_onnx, xs[i], states[i], int(srs[i]))
        np.testing.assert_allclose(out["prob"][i], r[0], rtol=1e-6)
        assert out["cls"][i].tolist() == r[2].tolist()


@pytest.mark.parametrize("feed, match", [
    ({"x": np.zeros((1, 4)), "state": np.zeros((2, 1, 3)), "sr": 16000.5}, r"'sr' takes int64 values; got numbers that are not whole"),
    ({"x": np.zeros((1, 4)), "state": np.zeros((2, 1, 3)), "sr": "16k"}, r"'sr': not a numeric array"),
    ({"x": np.zeros((1, 4)), "state": np.zeros((3, 1, 3)), "sr": 16000}, r"'state': expected shape \(N, 2, \?, 3\), got \(1, 3, 1, 3\)"),
    ({"x": np.zeros((2, 1, 4)), "state": np.zeros((2, 1, 3)), "sr": 16000}, r"different numbers of samples on axis 0 \(x: 2, state: 1, sr: 1\)"),
    ({"x": np.zeros((0, 1, 4)), "state": np.zeros((0, 2, 1, 3)), "sr": np.zeros(0, np.int64)}, r"no samples"),
])
def test_bad_input_is_refused_with_a_clear_message(vad_onnx, feed, match):
    with pytest.raises(InputError, match=match):
        load_model(vad_onnx).predict(feed)


def test_integer_range_is_checked(tmp_path):
    from agent.manifest import TensorSpec
    from agent.runtime import _as_input

    with pytest.raises(InputError, match=r"'ids' takes int8 values; got 0..300, outside -128..127"):
        _as_input(np.array([0, 300]), TensorSpec("ids", "int8", (-1,)))
    with pytest.raises(InputError, match=r"'mask' takes bool values; got numbers other than 0 and 1"):
        _as_input([0, 2], TensorSpec("mask", "bool", (-1,)))
    assert _as_input([1.0, 0.0], TensorSpec("mask", "bool", (-1,))).dtype == np.bool_


def test_golden_replay_of_a_stacked_model(vad_onnx, tmp_path):
    """The golden set follows the same layout; integer outputs are replayed exactly."""
    from agent.golden import replay
    from agent.manifest import Manifest
    from toolkit.build.package import golden_set, npz_bytes

    m = load_model(vad_onnx)
    rng = np.random.default_rng(3)
    feed = {"x": rng.normal(size=(4, 1, 4)).astype(np.float32),
            "state": rng.normal(size=(4, 2, 1, 3)).astype(np.float32), "sr": np.full(4, 16000)}
    arrays, atol = golden_set(m, feed, 3)
    assert arrays["in.sr"].shape == (3,) and arrays["in.sr"].dtype == np.int64
    assert arrays["out.cls"].dtype == np.int64 and arrays["out.prob"].shape == (3, 1, 1)
    (tmp_path / "golden.npz").write_bytes(npz_bytes(arrays))
    manifest = Manifest(name="vad", version=1, profile="p", arch="x86_64", runtime="onnxruntime",
                        runtime_min_version="1", format="onnx", precision="fp32", threads=1,
                        model_file="model.onnx", files=(), inputs=m.inputs, outputs=m.outputs, key_id="k",
                        golden={"path": "golden.npz", "atol": atol, "rtol": 1e-3, "layout": "stack"})
    assert replay(m, manifest, tmp_path) <= atol
    arrays["out.cls"] = (arrays["out.cls"] + 1) % 3  # a model that gives other class ids
    (tmp_path / "golden.npz").write_bytes(npz_bytes(arrays))
    with pytest.raises(ModelError, match=r"output 'cls' differs from the golden set \(0.0% of its values equal"):
        replay(m, manifest, tmp_path)
    with pytest.raises(Exception, match=r"laid out as 'batch' but the model's inputs call for 'stack'"):
        replay(m, dataclasses.replace(manifest, golden=manifest.golden | {"layout": "batch"}), tmp_path)
