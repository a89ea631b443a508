"""Run the device tests inside emulated Raspberry Pi userlands (qemu-user, no binfmt_misc, no chroot).

.ci/aarch64-setup.sh (64-bit Pi OS: numpy 2, LiteRT, ONNX Runtime wheels) and .ci/armv7-setup.sh (32-bit
Pi OS: Debian's numpy 1.24, tflite-runtime 2.14) build the userlands; pytest is pure Python and runs in
them. The host builds the bundles (TensorFlow) and hands their paths over in a JSON file; inside,
tests/emulated_fixtures.py serves them instead of the host fixtures. Brokers, agents and clients a test
starts run there too; an agent subprocess starts through qemu (EDGESHIP_PYTHON_CMD, used by conftest).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("EDGESHIP_TEST_CACHE", Path.home() / ".cache" / "edgeship"))
# The modules holding device tests (marked `device`); a new module with device tests joins here.
DEVICE_MODULES = ("test_install.py", "test_http.py", "test_fleet.py", "test_fleet_transfer.py",
                  "test_telemetry.py", "test_bundle_format.py", "test_agent_config.py", "test_portability.py",
                  "test_capture.py")


@dataclass(frozen=True)
class Userland:
    name: str      # aarch64 | armv7
    machine: str   # platform.machine() inside
    qemu: str
    dest: Path
    marker: str    # the setup script's "ready" file
    cpu: str = ""  # QEMU_CPU

    @property
    def ready(self) -> bool:
        return (self.dest / self.marker).exists()

    @property
    def has_pytest(self) -> bool:
        return (self.dest / "site" / "pytest").is_dir()

    @property
    def setup(self) -> str:
        return f".ci/{self.name}-setup.sh {self.dest}"

    @property
    def python(self) -> list[str]:
        root = self.dest / "root"
        return [self.qemu, "-L", str(root), str(root / "usr" / "bin" / "python3.11")]

    def env(self, **extra: str) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "QEMU_LD_PREFIX": str(self.dest / "root"),
               "PYTHONPATH": f"{self.dest / 'site'}:{ROOT}", "EDGESHIP_TEST_ARCH": self.machine,
               "EDGESHIP_PYTHON_CMD": shlex.join(self.python), "LANG": "C.UTF-8"}
        if self.cpu:
            env["QEMU_CPU"] = self.cpu
        return {**env, **extra}


USERLANDS = {
    "aarch64": Userland("aarch64", "aarch64", "qemu-aarch64-static",
                        Path(os.environ.get("EDGESHIP_AARCH64", CACHE / "aarch64")), ".ready-3", "cortex-a72"),
    "armv7": Userland("armv7", "armv7l", "qemu-arm-static",
                      Path(os.environ.get("EDGESHIP_ARMV7", CACHE / "armv7")), ".ready-2"),
}


def write_inputs(path: Path, home: Path, digits: dict[str, Path], bundles: dict[str, Path]) -> Path:
    path.write_text(json.dumps({"home": str(home), "digits": {k: str(v) for k, v in digits.items()},
                                "bundles": {k: str(v) for k, v in bundles.items()}}))
    return path


@dataclass
class Outcome:
    returncode: int
    output: str
    tests: int
    failed: list[str]
    skipped: list[str]


def run_device_tests(land: Userland, module: str, inputs: Path, work: Path, timeout: float) -> Outcome:
    """``pytest -m device tests/MODULE`` in the userland; its processes are killed on timeout."""
    work.mkdir(parents=True, exist_ok=True)
    xml = work / "junit.xml"
    cmd = [*land.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "device", "-rfEs",
           f"--basetemp={work / 'tmp'}", f"--junitxml={xml}", str(ROOT / "tests" / module)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=land.env(EDGESHIP_DEVICE_INPUTS=str(inputs), HOME=str(work)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out += f"\n[emulation] killed after {timeout:.0f} s"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # agents or brokers a crashed test left behind
        except ProcessLookupError:
            pass
    tests, failed, skipped = 0, [], []
    if xml.exists():
        for case in ET.parse(xml).iter("testcase"):
            tests += 1
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(name)
            elif case.find("skipped") is not None:
                skipped.append(name)
    return Outcome(proc.returncode, out, tests, failed, skipped)
