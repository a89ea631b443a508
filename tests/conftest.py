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
def tflite_runtime_python(profile):
    """A venv with tflite-runtime 2.14.0 + numpy<2 (the 32-bit Raspberry Pi runtime), cached between
    runs. .ci/run installs it; without network access to PyPI the tests that need it are skipped."""
    from toolkit.errors import ToolkitError
    from toolkit.runtimes import install

    cache = Path(os.environ.get("EDGESHIP_TEST_CACHE", Path.home() / ".cache" / "edgeship"))
    try:
        return str(install(profile("rpi3-armv7"), cache / "runtimes" / "tflite-runtime-2.14.0"))
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


if os.environ.get("EDGESHIP_DEVICE_INPUTS"):  # inside an emulated userland: host-built inputs, no TensorFlow
    from emulated_fixtures import (  # noqa: F401,F811 - these replace the host fixtures of the same names
        digits, digits_build, digits_outlier, make_options, settings, tflite_runtime_python)
