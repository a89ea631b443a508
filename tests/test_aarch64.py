"""The agent on real aarch64 wheels (numpy, LiteRT, cryptography) under qemu, like a Raspberry Pi 4 with
64-bit Raspberry Pi OS. .ci/run prepares the emulated userland with .ci/aarch64-setup.sh."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from test_install import rebundle

EMU = Path(os.environ.get("EDGESHIP_AARCH64", Path.home() / ".cache" / "edgeship" / "aarch64"))


@pytest.mark.skipif(not (EMU / ".ready-2").exists(),
                    reason=f"no emulated aarch64 userland at {EMU} (run .ci/aarch64-setup.sh {EMU})")
def test_agent_smoke_on_emulated_raspberry_pi(digits_build, digits, signing_key, settings, tmp_path):
    v1 = next(p.bundle for p in digits_build.profiles if p.profile.name == "rpi4-arm64")
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
    root = EMU / "root"
    env = {"QEMU_CPU": "cortex-a72", "QEMU_LD_PREFIX": str(root), "PYTHONPATH": f"{EMU / 'site'}:{ROOT}",
           "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(["qemu-aarch64-static", "-L", str(root), str(root / "usr/bin/python3.11"),
                           str(ROOT / "tests" / "aarch64_smoke.py"), str(tmp_path / "state"),
                           str(settings.keyring_path), str(v1), str(tmp_path / "v2.patch"), str(tmp_path / "bad.bundle"),
                           str(tmp_path / "x.npy")], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    rpi4 = next(p for p in digits_build.profiles if p.profile.name == "rpi4-arm64")
    assert out["machine"] == "aarch64" and out["runtime"] == rpi4.chosen.runtime  # LiteRT or ONNX Runtime
    assert out["install_v1"] == ["Verify", "Stage", "VerifyModel", "Commit", "Cleanup"]
    assert out["infer_status"] == 200 and sum(a == b for a, b in zip(out["infer_top1"], y)) >= 5
    assert out["delta_applied"] is True and out["install_v2"] == "installed" and out["serving_after_v2"] == 2
    assert out["telemetry"]["count"] == 4 and out["telemetry"]["p95_ms"] > 0
    assert out["tampered"][0] == "refused"
    assert out["rollback_to"].startswith("digits-v1") and out["serving_after_rollback"] == 1
    assert out["predict_status"] == 200 and out["predict_label"] == [str(y[0])]
