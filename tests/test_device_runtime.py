"""Variants are checked in the exact runtime the device has: tflite-runtime 2.14 with numpy<2."""

from __future__ import annotations

import shutil

from toolkit.build.pipeline import build
from toolkit.profiles import BUILTIN_DIR, load_profile_file

RUNTIME = "tflite-runtime-2.14.0"


def test_rpi3_variants_load_in_tflite_runtime_214(make_options, tflite_runtime_python, tmp_path):
    r = build(make_options(tmp_path / "dist", ["rpi3-armv7"], version=1,
                           runtime_pythons={RUNTIME: tflite_runtime_python}))
    p = r.profiles[0]
    assert p.bundle is not None
    for v in p.variants:
        assert v.passed, v.reasons
        assert v.latency["runtime"] == "tflite-runtime" and v.latency["runtime_version"] == "2.14.0"
        assert v.latency["numpy"].startswith("1.")
        assert any("loaded and measured in tflite-runtime 2.14.0" in n for n in v.notes)
    assert not any("checked in LiteRT only" in n for n in p.notes)


def test_variant_that_crashes_or_fails_in_the_runtime_is_refused(make_options, tflite_runtime_python,
                                                                 tmp_path):
    """An int16x8 LayerNormalization model: tflite-runtime 2.14 has no int16 RSQRT kernel, and
    LiteRT 2.3 aborts the process on a batch of it. Both are refused by the gate, the build survives
    (each variant runs in its own process) and ships fp32."""
    import numpy as np

    from toolkit.tfenv import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(0)
    x = keras.Input((16,), name="x")
    h = keras.layers.LayerNormalization(name="norm")(keras.layers.Dense(32, name="d1")(x))
    model = keras.Model(x, keras.layers.Dense(4, name="out")(h))
    mpath = tmp_path / "norm.keras"
    model.save(mpath)
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32))
    prof = tmp_path / "rpi3-int16.toml"
    shutil.copy(BUILTIN_DIR / "rpi3-armv7.toml", prof)
    prof.write_text(prof.read_text().replace('name = "rpi3-armv7"', 'name = "rpi3-int16"')
                    .replace('accepted = ["int8", "fp16", "fp32"]', 'accepted = ["int16x8", "fp32"]'))
    opts = make_options(tmp_path / "dist", [], model=mpath, validation=data, calibration=data, meta={},
                        version=1)
    opts.profiles = [load_profile_file(prof)]
    host_only = build(opts)
    v = next(v for v in host_only.profiles[0].variants if v.precision == "int16x8")
    assert not v.passed and "runtime process crashed (signal 6)" in v.reasons[0], v.reasons
    assert host_only.profiles[0].chosen.precision == "fp32"
    opts.runtime_pythons = {RUNTIME: tflite_runtime_python}
    opts.out_dir = tmp_path / "dist2"
    r = build(opts)
    v = next(v for v in r.profiles[0].variants if v.precision == "int16x8")
    assert not v.passed
    assert "does not load or run in tflite-runtime 2.14.0" in v.reasons[0], v.reasons
    assert "INT16" in v.reasons[0] or "RSQRT" in v.reasons[0], v.reasons
    assert r.profiles[0].chosen.precision == "fp32"
