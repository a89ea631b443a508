"""Shared fixtures. TensorFlow-backed fixtures are session-scoped so the suite trains and builds once."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The device the agent tests act as: a Raspberry Pi 4 (its arch pretended on this host) or, inside an
# emulated userland (tests/emulation.py), that userland's own arch. PYTHON starts a Python process there
# (qemu-user without binfmt_misc cannot exec the emulated sys.executable directly).
DEVICE_ARCH = os.environ.get("EDGESHIP_TEST_ARCH", "aarch64")
DEVICE_PROFILE = {"aarch64": "rpi4-arm64", "armv7l": "rpi3-armv7", "x86_64": "x86_64-onnx"}[DEVICE_ARCH]
PYTHON = shlex.split(os.environ.get("EDGESHIP_PYTHON_CMD", "")) or [sys.executable]


def device_bundle(build) -> Path:
    """The bundle a build made for the device under test."""
    return next(p.bundle for p in build.profiles if p.profile.name == DEVICE_PROFILE)


@pytest.fixture(scope="session")
def settings(tmp_path_factory):
    from toolkit.settings import Settings

    return Settings(tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="session")
def signing_key(settings):
    from toolkit.signing import load_or_create

    return load_or_create(settings.key_path)


@pytest.fixture(scope="session")
def keyring(signing_key):
    from agent.keys import Keyring

    return Keyring.of(signing_key.public_raw)


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The digits example: model, calibration/validation/training data and metadata."""
    from toolkit.examples import write_digits

    return write_digits(tmp_path_factory.mktemp("digits"), epochs=30)


@pytest.fixture(scope="session")
def digits_outlier(tmp_path_factory, digits):
    """A digits model whose plain int8 conversion is broken by one outlier activation."""
    from toolkit.examples import write_digits

    return write_digits(tmp_path_factory.mktemp("outlier"), epochs=30, outlier=True)


@pytest.fixture(scope="session")
def quick_latency():
    from toolkit.build.measure import LatencyConfig

    return LatencyConfig(runs=5, seconds=0.02, warmup_runs=1, warmup_seconds=0.01, gate=False)


@pytest.fixture(scope="session")
def profile(settings):
    from toolkit.profiles import find_profile, search_dirs

    return lambda name: find_profile(name, search_dirs())


@pytest.fixture(scope="session")
def make_options(signing_key, quick_latency, profile, digits):
    from toolkit.build.pipeline import BuildOptions

    def make(out_dir, profiles, paths=None, **kw):
        paths = paths or digits
        kw.setdefault("validation", paths["validation"])
        kw.setdefault("calibration", paths["calibration"])
        kw.setdefault("meta", json.loads(paths["meta"].read_text()))
        kw.setdefault("latency", quick_latency)
        return BuildOptions(model=kw.pop("model", paths["model"]), profiles=[profile(p) for p in profiles],
                            out_dir=Path(out_dir), key=signing_key, **kw)
    return make


@pytest.fixture(scope="session")
def digits_build(tmp_path_factory, make_options):
    """One build of the digits example for three profiles (LiteRT, tflite-runtime, ONNX Runtime)."""
    from toolkit.build.pipeline import build

    out = tmp_path_factory.mktemp("dist")
    return build(make_options(out, ["rpi4-arm64", "rpi3-armv7", "x86_64-onnx"], version=1,
                              keep_variants=out / "variants"))


def run_py(code: str, **env) -> str:
    """Run Python code in a fresh interpreter; returns stdout."""
    import subprocess

    proc = subprocess.run([*PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="session")
def tflite_runtime_python(profile, settings):
    """A venv with tflite-runtime 2.14.0 + numpy<2 (the 32-bit Raspberry Pi runtime), in the one runtimes
    cache the CLI uses too (`edgeship runtimes install rpi3-armv7`, which .ci/run runs); without network
    access to PyPI the tests that need it are skipped."""
    from toolkit.errors import ToolkitError
    from toolkit.runtimes import install

    p = profile("rpi3-armv7")
    try:
        return str(install(p, settings.runtime_env(p.runtime, p.runtime_version)))
    except ToolkitError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"tflite-runtime 2.14 environment unavailable: {exc}")


@pytest.fixture()
def broker():
    """A real Mosquitto on a free port (not under tmp_path: pytest's folders are 0700 and mosquitto,
    dropping root, must write its persistence db)."""
    import shutil
    import tempfile

    from mosquitto import Mosquitto

    folder = Path(tempfile.mkdtemp(prefix="edgeship-mosq-"))
    m = Mosquitto(folder).start()
    yield m
    m.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def fleet_bundles(digits_build, signing_key, tmp_path_factory):
    from test_install import rebundle

    d = tmp_path_factory.mktemp("fb")
    v1 = device_bundle(digits_build)
    return {"v1": v1, "v2": rebundle(v1, d / "v2.bundle", signing_key, version=2)}


@pytest.fixture(scope="session")
def retrained_v2(digits, fleet_bundles, signing_key, make_options, profile, tmp_path_factory):
    """A real v2 of the fleet's digits model: its classifier head retrained (on labels shifted by one: v2
    answers class+1, same architecture and speed) and rebuilt by the pipeline for rpi4-arm64 in the
    precision v1 was shipped in. For delta updates of a real change and for accuracy verdicts."""
    import dataclasses
    import re

    import numpy as np

    from agent.bundle import inspect_bundle
    from toolkit.build.pipeline import build
    from toolkit.examples import digits_data
    from toolkit.profiles import load_profile_file
    from toolkit.tfenv import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(1)
    out = tmp_path_factory.mktemp("v2")
    model = keras.models.load_model(digits["model"])
    for layer in model.layers:
        layer.trainable = layer.name == "probs"
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    data = digits_data()
    model.fit(data["x_train"], (data["y_train"] + 1) % 10, epochs=15, batch_size=32, verbose=0)
    (out / "m").mkdir()
    model.save(out / "m" / "digits.keras")
    np.savez(out / "val.npz", image=data["x_val"])  # no labels: the gate compares with v2's own fp32
    precision = inspect_bundle(fleet_bundles["v1"])[0]["precision"]
    toml = re.sub(r"(?m)^accepted = .*$", f'accepted = ["{precision}"]', profile("rpi4-arm64").path.read_text())
    (out / "p").mkdir()
    (out / "p" / "rpi4-arm64.toml").write_text(toml)
    opts = make_options(out / "dist", ["rpi4-arm64"], version=2, model=out / "m" / "digits.keras",
                        validation=out / "val.npz")
    opts = dataclasses.replace(opts, profiles=[load_profile_file(out / "p" / "rpi4-arm64.toml")])
    res = build(opts)
    assert res.profiles[0].bundle is not None, res.table()
    return res.profiles[0].bundle


if os.environ.get("EDGESHIP_DEVICE_INPUTS"):  # inside an emulated userland: host-built inputs, no TensorFlow
    from emulated_fixtures import (  # noqa: F401,F811 - these replace the host fixtures of the same names
        digits, digits_build, digits_outlier, make_options, settings, tflite_runtime_python)
