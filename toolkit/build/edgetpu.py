"""Edge TPU: compile the full-int8 model with ``edgetpu_compiler`` when it is on PATH.

The compiler only exists for x86_64 Debian/Ubuntu hosts with Coral's apt repository; when it is
missing, the bundle carries the int8 model ready for it and the build says so.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from toolkit.errors import ConversionError
from toolkit.build.gate import VariantResult
from toolkit.profiles import Profile


def maybe_compile(variant: VariantResult, profile: Profile, work: Path) -> tuple[bytes | None, list[str]]:
    if not profile.edgetpu:
        return None, []
    compiler = shutil.which("edgetpu_compiler")
    if compiler is None:
        return None, ["edgetpu_compiler not found on PATH: the bundle holds the full-int8 model with "
                      "uint8 I/O, ready for `edgetpu_compiler model.tflite` (not compiled here)"]
    assert variant.file is not None
    proc = subprocess.run([compiler, "-s", "-o", str(work), str(variant.file)], capture_output=True,
                          text=True, timeout=600)
    out = work / (variant.file.stem + "_edgetpu.tflite")
    if proc.returncode != 0 or not out.is_file():
        raise ConversionError(f"edgetpu_compiler failed on {variant.file.name}: "
                              f"{proc.stderr.strip() or proc.stdout.strip()}")
    return out.read_bytes(), ["compiled for the Edge TPU with edgetpu_compiler"]
