"""What this device really has, checked against what a bundle's manifest asks for, before anything is
installed: the architecture, the profile the device is configured as, the runtime and its version
(``runtime.name`` >= ``runtime.min_version``), the NumPy constraint (``runtime.numpy``, e.g. "<2") and
the delegate (``edgetpu`` needs libedgetpu). Versions are read from the installed packages, not assumed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re

from agent.errors import CompatibilityError, RuntimeMissingError
from agent.manifest import Manifest

# runtime name -> (importable module, distribution names to ask for the version, install hint)
RUNTIMES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "litert": ("ai_edge_litert", ("ai-edge-litert",), "pip install ai-edge-litert"),
    "tflite-runtime": ("tflite_runtime", ("tflite-runtime", "tflite_runtime"),
                       "pip install tflite-runtime (32-bit ARM, numpy<2)"),
    "onnxruntime": ("onnxruntime", ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino",
                                    "onnxruntime-directml"), "pip install onnxruntime"),
}
# Delegates that ship inside every TFLite runtime (or mean "none"); others need a library on the device.
BUILTIN_DELEGATES = {"", "none", "xnnpack", "cpu"}
DELEGATE_LIBRARIES = {"edgetpu": ("libedgetpu.so.1", "apt-get install libedgetpu1-std (Coral Edge TPU runtime)")}
_OPS = ("<=", ">=", "==", "!=", "<", ">")


def check(m: Manifest, arch: str, profile: str | None = None) -> None:
    """Raise CompatibilityError / RuntimeMissingError when ``m`` cannot run as built on this device."""
    if m.arch != arch:
        raise CompatibilityError(f"{m.id} is built for {m.arch}; this device is {arch}")
    if profile and m.profile != profile:
        raise CompatibilityError(f"{m.id} is built for profile {m.profile!r}; this device is configured as "
                                 f"{profile!r} (agent.profile)")
    have = runtime_version(m.runtime)
    if have is None:
        raise RuntimeMissingError(f"{m.id} needs {m.runtime} >= {m.runtime_min_version}, which is not installed "
                                  f"on this device; {RUNTIMES[m.runtime][2]}")
    if _version(have) < _version(m.runtime_min_version):
        raise RuntimeMissingError(f"{m.id} needs {m.runtime} >= {m.runtime_min_version}; this device has "
                                  f"{have}; upgrade it ({RUNTIMES[m.runtime][2]})")
    rt = m.data.get("runtime") or {}
    numpy_spec = rt.get("numpy")
    if numpy_spec:
        import numpy

        if not satisfies(numpy.__version__, str(numpy_spec)):
            raise CompatibilityError(f"{m.id} needs numpy {numpy_spec} (runtime.numpy); this device has "
                                     f"{numpy.__version__}")
    delegate = str(rt.get("delegate") or "none").lower()
    if delegate not in BUILTIN_DELEGATES:
        lib = DELEGATE_LIBRARIES.get(delegate)
        if lib is None:
            raise CompatibilityError(f"{m.id} needs the {delegate!r} delegate, which this agent does not know")
        _load_library(m, delegate, *lib)


def runtime_version(runtime: str) -> str | None:
    """The installed version of ``runtime`` (None: not installed)."""
    module, dists, _ = RUNTIMES[runtime]
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return str(getattr(importlib.import_module(module), "__version__", "0"))


def satisfies(version: str, spec: str) -> bool:
    """``version`` meets every clause of a simple specifier such as "<2", ">=1.24,<2" or "==2.14.0"."""
    for clause in (c.strip() for c in spec.split(",") if c.strip()):
        op = next((o for o in _OPS if clause.startswith(o)), "==")
        want, got = _version(clause[len(op):] if clause.startswith(op) else clause), _version(version)
        ok = {"<=": got <= want, ">=": got >= want, "==": got == want, "!=": got != want,
              "<": got < want, ">": got > want}[op]
        if not ok:
            return False
    return True


def _version(v: str) -> tuple[int, int, int]:
    """The numeric release part of a version ("2.14.0", "1.32.0.dev2025", "2") for ordering."""
    nums = [int(x) for x in re.findall(r"\d+", v.split("+")[0].strip())[:3]]
    return tuple(nums + [0] * (3 - len(nums)))  # type: ignore[return-value]


def _load_library(m: Manifest, delegate: str, library: str, hint: str) -> None:
    import ctypes

    try:
        ctypes.CDLL(library)
    except OSError as exc:
        raise RuntimeMissingError(f"{m.id} needs the {delegate} delegate, but {library} cannot be loaded "
                                  f"({exc}); {hint}") from exc
