"""What a device has and what it can take: `edgeship-agent doctor`, and the refusal of bundles whose runtime
cannot exist on the device (no LiteRT or ONNX Runtime on 32-bit ARM).

The `device` tests run here (x86_64 host) and inside the emulated userlands (`pytest -m emulated`), each
time against the machine they really run on: its expectations are in MACHINES, not asked of the code.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from agent.serve.service import Agent
from conftest import PYTHON, ROOT
from test_install import rebundle

MACHINE = platform.machine()
# Per real machine: its own profile, the runtimes installed and usable in the test environment, and which
# bundle runtimes it can run (LiteRT also runs bundles built for tflite-runtime). The emulated 64-bit Pi OS
# has LiteRT + ONNX Runtime wheels; the emulated 32-bit one has tflite-runtime only (no wheels for the rest).
MACHINES = {
    "x86_64": ("x86_64-onnx", {"litert", "onnxruntime"}, {"litert", "onnxruntime", "tflite-runtime"}),
    "aarch64": ("rpi4-arm64", {"litert", "onnxruntime"}, {"litert", "onnxruntime", "tflite-runtime"}),
    "armv7l": ("rpi3-armv7", {"tflite-runtime"}, {"tflite-runtime"}),
}
NATIVE, USABLE, RUNS_HERE = MACHINES[MACHINE]
SOURCE = {"litert": "rpi4-arm64", "onnxruntime": "x86_64-onnx", "tflite-runtime": "rpi3-armv7"}


def doctor(*args: str, env: dict | None = None) -> tuple[int, dict]:
    proc = subprocess.run([*PYTHON, "-m", "agent.cli", "doctor", "--json", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def built(digits_build):
    return {p.profile.name: p.bundle for p in digits_build.profiles}


@pytest.fixture(scope="module")
def here(built, signing_key, tmp_path_factory):
    """Each runtime's bundle re-signed as if built for this machine's arch (e.g. an ONNX bundle that claims
    armv7l): only the runtime check can tell whether it runs here."""
    d = tmp_path_factory.mktemp("here")
    return {rt: rebundle(built[prof], d / f"{rt}.bundle", signing_key, arch=MACHINE, version=5)
            for rt, prof in SOURCE.items()}


@pytest.mark.device
def test_doctor_reports_what_this_machine_has(tmp_path):
    from importlib import metadata

    code, doc = doctor("--state-dir", str(tmp_path / "state"))
    assert code == 0 and doc["arch"] == MACHINE and doc["python"] == platform.python_version()
    assert doc["numpy"] == np.__version__
    for name, dist in (("litert", "ai-edge-litert"), ("tflite-runtime", "tflite-runtime"),
                       ("onnxruntime", "onnxruntime")):
        try:
            installed = metadata.version(dist)
        except metadata.PackageNotFoundError:
            installed = None
        r = doc["runtimes"][name]
        assert r["version"] == installed and r["usable"] is (name in USABLE), (name, r)
        if MACHINE == "armv7l" and name != "tflite-runtime":
            assert r["version"] is None and f"{name} has no wheels for armv7l" in r["no_wheels"]
    import zstandard

    assert doc["zstandard"] == zstandard.__version__
    free = shutil.disk_usage(tmp_path).free
    assert abs(doc["free_bytes"] - free) < 0.05 * free and doc["state_dir"] == str(tmp_path / "state")
    assert not (tmp_path / "state").exists()  # doctor writes nothing
    assert doc["time_sync"] in ("yes", "no", "unknown") and doc["time_sync_source"]


@pytest.mark.device
def test_time_sync_asks_timedatectl_first(tmp_path, monkeypatch):
    from agent.device import time_sync

    fake = tmp_path / "timedatectl"
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    for answer in ("yes", "no"):
        fake.write_text(f"#!/bin/sh\n[ \"$*\" = 'show -p NTPSynchronized --value' ] && echo {answer}\n")
        fake.chmod(0o755)
        assert time_sync() == (answer, "timedatectl")
    fake.write_text("#!/bin/sh\necho 'System has not been booted with systemd'; exit 1\n")
    state, source = time_sync()  # falls back to the kernel's clock state
    assert state in ("yes", "no", "unknown") and source != "timedatectl"


@pytest.mark.device
def test_doctor_says_whether_each_bundle_would_install(tmp_path, built, here, settings):
    ring = str(settings.keyring_path)
    code, doc = doctor("--bundle", str(built[NATIVE]), "--keyring", ring, "--state-dir", str(tmp_path))
    checks = {c["check"]: c for c in doc["bundle"]["checks"]}
    assert code == 0 and doc["bundle"]["would_install"] is True, doc["bundle"]
    assert all(c["ok"] for c in checks.values()) and "trusted key" in checks["signature"]["detail"]
    for profile, bundle in built.items():  # bundles for other machines: refused on arch, with the reason
        if profile == NATIVE:
            continue
        code, doc = doctor("--bundle", str(bundle), "--keyring", ring, "--state-dir", str(tmp_path))
        checks = {c["check"]: c for c in doc["bundle"]["checks"]}
        assert code == 1 and doc["bundle"]["would_install"] is False
        assert checks["arch"]["ok"] is False and "this device is " + MACHINE in checks["arch"]["detail"]
    for rt, bundle in here.items():  # right arch: the runtime decides
        code, doc = doctor("--bundle", str(bundle), "--keyring", ring, "--state-dir", str(tmp_path))
        checks = {c["check"]: c for c in doc["bundle"]["checks"]}
        assert checks["arch"]["ok"] is True
        assert checks["runtime"]["ok"] is (rt in RUNS_HERE), (rt, checks["runtime"])
        assert (code == 0) is (rt in RUNS_HERE)
        if rt not in RUNS_HERE:
            assert f"needs {rt}, but {rt} has no wheels for {MACHINE}" in checks["runtime"]["detail"]
            assert "rpi3-armv7" in checks["runtime"]["detail"]
    code, doc = doctor("--bundle", str(built[NATIVE]), "--state-dir", str(tmp_path),
                       env={"EDGESHIP_AGENT_KEYRING": str(tmp_path / "no-keyring-here")})
    checks = {c["check"]: c for c in doc["bundle"]["checks"]}
    assert code == 0 and doc["bundle"]["would_install"] is None and checks["signature"]["ok"] is None
    bad = tmp_path / "tampered.bundle"
    data = bytearray(built[NATIVE].read_bytes())
    data[len(data) // 2] ^= 1
    bad.write_bytes(bytes(data))
    code, doc = doctor("--bundle", str(bad), "--keyring", ring, "--state-dir", str(tmp_path))
    checks = {c["check"]: c for c in doc["bundle"]["checks"]}
    assert code == 1 and checks["signature"]["ok"] is False and checks["arch"]["ok"] is True


@pytest.mark.device
def test_install_refuses_a_runtime_this_machine_cannot_have(tmp_path, here, keyring):
    """The install engine refuses, with the profile's message, what the machine cannot run; the rest
    installs and serves (a tflite-runtime bundle also runs in LiteRT)."""
    for rt, bundle in here.items():
        agent = Agent(tmp_path / rt, keyring, MACHINE)
        agent.start()
        res = agent.install(bundle)
        if rt in RUNS_HERE:
            assert res.status == "installed", (rt, res)
            assert agent.predict(np.zeros((1, 8, 8, 1), np.float32))["probs"].shape == (1, 10)
        else:
            assert res.status == "refused" and res.chain == ["Verify", "Failure", "Cleanup"], res
            assert f"needs {rt}, but {rt} has no wheels for {MACHINE}" in res.reason, res.reason
            assert agent.current is None and not list((tmp_path / rt / "slots").iterdir())


def test_toolkit_refuses_onnx_for_32_bit_arm(tmp_path, digits, digits_build, make_options, profile):
    """An ONNX model cannot become a rpi3-armv7 bundle (no TFLite converter from ONNX, and no ONNX Runtime
    for armv7l): the profile's verdict says so and no bundle is written; a profile that puts ONNX Runtime on
    armv7l is refused before any work."""
    from click.testing import CliRunner

    from toolkit.build.pipeline import build
    from toolkit.cli import cli
    from toolkit.errors import BuildFailed

    onnx = next(Path(digits_build.profiles[0].bundle).parent.glob("variants/x86_64-onnx-fp32.onnx"))
    with pytest.raises(BuildFailed, match="rpi3-armv7.*onnxruntime has no wheels for armv7l"):
        build(make_options(tmp_path / "d", ["rpi3-armv7"], model=onnx, version=1))
    assert not list(tmp_path.glob("d/*.bundle"))
    prof = tmp_path / "pi3-onnx.toml"
    prof.write_text(profile("x86_64-onnx").path.read_text().replace('name = "x86_64-onnx"', 'name = "pi3-onnx"')
                    .replace('arch = "x86_64"', 'arch = "armv7l"'))
    res = CliRunner().invoke(cli, ["--home", str(tmp_path / "h"), "build", str(onnx), "-p", str(prof),
                                   "--validation", str(digits["validation"]), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and "runtime.name: onnxruntime has no wheels for armv7l" in res.output, res.output
    assert "rpi3-armv7" in res.output and not (tmp_path / "o").exists()
