"""Device-runtime environments on the host, to load and time variants in the exact runtime a
device has (e.g. tflite-runtime 2.14 with numpy<2 for 32-bit Raspberry Pi OS)."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

from toolkit.errors import ToolkitError
from toolkit.profiles import Profile

PACKAGES = {"tflite-runtime": lambda v: [f"tflite-runtime=={v}", "numpy<2"],
            "litert": lambda v: [f"ai-edge-litert=={v}", "numpy"],
            "onnxruntime": lambda v: [f"onnxruntime=={v}", "numpy"]}


def install(profile: Profile, target: Path) -> Path:
    """Create a venv at ``target`` holding the profile's runtime; returns its python."""
    if profile.runtime not in PACKAGES:
        raise ToolkitError(f"no runtime environment recipe for {profile.runtime}")
    if (target / ".ready").exists():
        return target / "bin" / "python"
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    pkgs = PACKAGES[profile.runtime](profile.runtime_version)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, capture_output=True)
        proc = subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q",
                               "--disable-pip-version-check", *pkgs], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ToolkitError(f"could not install {' '.join(pkgs)} for {platform.machine()} "
                               f"({(proc.stderr.strip().splitlines() or ['pip failed'])[-1]})")
    except (OSError, subprocess.CalledProcessError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ToolkitError(f"could not create a venv at {tmp} ({exc})") from exc
    except ToolkitError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The venv's python resolves its prefix from its own path, so move before marking it ready.
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    subprocess.run([str(target / "bin" / "python"), "-m", "pip", "--version"], check=True,
                   capture_output=True)
    (target / ".ready").write_text(" ".join(pkgs) + "\n")
    return target / "bin" / "python"
