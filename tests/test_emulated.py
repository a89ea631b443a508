"""The agent on emulated Raspberry Pi userlands: 64-bit Pi OS (aarch64: numpy 2, LiteRT, ONNX Runtime
wheels) and 32-bit Pi OS (armv7l: Debian's numpy 1.24, tflite-runtime 2.14). .ci/run prepares both with
.ci/aarch64-setup.sh and .ci/armv7-setup.sh.

In the default run: one smoke run per userland (skipped where it is not prepared). Behind the `emulated`
marker (`python -m pytest -m emulated`): every device test (marked `device`), one emulated pytest per
module and userland, see tests/emulation.py.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from conftest import ROOT
from emulation import DEVICE_MODULES, USERLANDS, run_device_tests, write_inputs
from test_install import rebundle

PROFILE = {"aarch64": "rpi4-arm64", "armv7": "rpi3-armv7"}


@pytest.mark.parametrize("arch", sorted(USERLANDS))
def test_agent_smoke_on_emulated_raspberry_pi(arch, digits_build, digits, signing_key, settings, tmp_path):
    land = USERLANDS[arch]
    if not land.ready:
        pytest.skip(f"no emulated {arch} userland at {land.dest} (run {land.setup})")
    v1 = next(p.bundle for p in digits_build.profiles if p.profile.name == PROFILE[arch])
    v2 = rebundle(v1, tmp_path / "v2.bundle", signing_key, version=2)
    data = bytearray(v2.read_bytes())
    data[len(data) // 3] ^= 1
    (tmp_path / "bad.bundle").write_bytes(bytes(data))
    with np.load(digits["validation"]) as v:
        x, y = v["image"][:6], v["y"][:6]
    np.save(tmp_path / "x.npy", x)
    from agent.fleet.delta import make_patch
    from toolkit.fleet.publish import base_content

    p = make_patch(base_content(v1), v2.read_bytes())  # v2 reaches the device as a patch against v1
    (tmp_path / "v2.patch").write_bytes(p["patch"])
    (tmp_path / "v2.patch.json").write_text(json.dumps({k: p[k] for k in ("window_log", "target_sha256")}
                                                       | {"target_size": v2.stat().st_size}))
    from agent.seal import generate_model_key, model_key_id
    from toolkit.fleet.sealing import seal_bundle

    pem, pub = generate_model_key()  # v3 encrypted for this device's model key
    (tmp_path / "model.key").write_bytes(pem)
    v3 = rebundle(v1, tmp_path / "v3.bundle", signing_key, version=3)
    sealed = seal_bundle(v3, {model_key_id(pub): pub}, signing_key, tmp_path / "sealed").path
    proc = subprocess.run([*land.python, str(ROOT / "tests" / "emulated_smoke.py"), str(tmp_path / "state"),
                           str(settings.keyring_path), str(v1), str(tmp_path / "v2.patch"), str(tmp_path / "bad.bundle"),
                           str(tmp_path / "x.npy"), str(sealed), str(tmp_path / "model.key")],
                          env=land.env(HOME=str(tmp_path)), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    chosen = next(p for p in digits_build.profiles if p.profile.name == PROFILE[arch]).chosen
    assert out["machine"] == land.machine and out["runtime"] == chosen.runtime  # LiteRT or ONNX Runtime on a Pi 4
    assert out["install_v1"] == ["Verify", "Stage", "VerifyModel", "Commit", "Cleanup"]
    assert out["infer_status"] == 200 and sum(a == b for a, b in zip(out["infer_top1"], y)) >= 5
    assert out["delta_applied"] is True and out["install_v2"] == "installed" and out["serving_after_v2"] == 2
    assert out["telemetry"]["count"] == 4 and out["telemetry"]["p95_ms"] > 0
    assert out["tampered"][0] == "refused"
    assert out["rollback_to"].startswith("digits-v1") and out["serving_after_rollback"] == 1
    assert out["predict_status"] == 200 and out["predict_label"] == [str(y[0])]
    assert out["install_sealed"] == "installed" and out["serving_sealed"] == 3


@pytest.fixture(scope="session")
def device_inputs(tmp_path_factory, settings, signing_key, digits, digits_build):
    bundles = {p.profile.name: p.bundle for p in digits_build.profiles if p.bundle}
    return write_inputs(tmp_path_factory.mktemp("emulated") / "inputs.json", settings.home, digits, bundles)


@pytest.mark.emulated
@pytest.mark.parametrize("module", DEVICE_MODULES)
@pytest.mark.parametrize("arch", sorted(USERLANDS))
def test_device_tests_pass_in_emulated_userland(arch, module, device_inputs, tmp_path):
    land = USERLANDS[arch]
    if not (land.ready and land.has_pytest):
        pytest.fail(f"no emulated {arch} userland with pytest at {land.dest}: run {land.setup}")
    res = run_device_tests(land, module, device_inputs, tmp_path, timeout=1800)
    assert res.returncode == 0 and res.tests > 0 and not res.failed, \
        f"{arch} {module}: {res.tests} tests, failed {res.failed}\n{res.output[-8000:]}"
    assert not res.skipped, f"device tests must run, not skip, on {arch}: {res.skipped}\n{res.output[-3000:]}"
