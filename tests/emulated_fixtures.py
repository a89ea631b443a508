"""Fixtures inside an emulated Raspberry Pi userland (tests/emulation.py runs pytest there).

TensorFlow cannot run there, so what the host fixtures would train and build comes from files the host
made in the same session (EDGESHIP_DEVICE_INPUTS: a JSON of paths). Host-only fixtures fail loudly: a
test that needs them is not a device test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

_INPUTS = json.loads(Path(os.environ["EDGESHIP_DEVICE_INPUTS"]).read_text())


@pytest.fixture(scope="session")
def settings():
    from toolkit.settings import Settings

    return Settings(Path(_INPUTS["home"]))  # the host's keys: bundles are signed with them


@pytest.fixture(scope="session")
def digits():
    return {k: Path(v) for k, v in _INPUTS["digits"].items()}


@pytest.fixture(scope="session")
def digits_build():
    return SimpleNamespace(profiles=[SimpleNamespace(profile=SimpleNamespace(name=name), bundle=Path(path))
                                     for name, path in _INPUTS["bundles"].items()])


def _host_only(name: str):
    @pytest.fixture(scope="session", name=name)
    def fixture():
        pytest.fail(f"fixture {name!r} needs the host (TensorFlow); it is not available inside the emulated "
                    f"userland: do not mark this test `device`")
    return fixture


make_options = _host_only("make_options")
digits_outlier = _host_only("digits_outlier")
tflite_runtime_python = _host_only("tflite_runtime_python")
