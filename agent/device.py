"""What this device has: architecture, Python, NumPy, inference runtimes and their versions, delegates,
zstandard, free disk and clock sync — and whether that is what a bundle's manifest asks for.

The install engine's Verify refuses a bundle with the first of ``problems``; ``edgeship-agent doctor``
prints all of them (and everything else here), so doctor and a real update cannot disagree. Every probe answers for this process as it runs: a runtime
counts as installed only when it imports, and anything the device cannot tell is reported as unknown.
"""

from __future__ import annotations

import ctypes
import importlib
import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

import agent.runtime as rt
from agent.errors import AgentError, CompatibilityError, RuntimeMissingError, StorageError
from agent.manifest import Manifest, no_wheels

# Runtimes the agent can use, with the distribution that carries each (for its version).
DISTS = {"litert": "ai-edge-litert", "tflite-runtime": "tflite-runtime", "onnxruntime": "onnxruntime",
         "tensorflow": "tensorflow"}
DEVICE_RUNTIMES = ("litert", "tflite-runtime", "onnxruntime")  # what doctor reports (not TensorFlow)
# Which installed runtimes may run a bundle built for a runtime, in order of preference:
# LiteRT runs what tflite-runtime 2.14 runs, not the reverse (LiteRT models may use newer op versions).
# TensorFlow's own interpreter stands in on development hosts only.
RUNS_ON: dict[str, tuple[str, ...]] = {
    "litert": ("litert", "tensorflow"),
    "tflite-runtime": ("litert", "tflite-runtime", "tensorflow"),
    "onnxruntime": ("onnxruntime",),
}
# Delegates that ship inside every TFLite runtime (or mean "none"); others need a library on the device.
BUILTIN_DELEGATES = {"", "none", "xnnpack", "cpu"}
DELEGATE_LIBRARIES = {"edgetpu": ("libedgetpu.so.1", "apt-get install libedgetpu1-std (Coral Edge TPU runtime)")}
_CLAUSE = re.compile(r"^\s*(<=|>=|==|!=|<|>)\s*([0-9][0-9.]*)\s*$")


@dataclass(frozen=True)
class Runtime:
    """One inference runtime as this process sees it. ``version`` is None when it is not installed;
    ``problem`` says why an installed runtime cannot work here."""

    name: str
    version: str | None
    problem: str = ""

    @property
    def usable(self) -> bool:
        return self.version is not None and not self.problem


def runtime(name: str) -> Runtime:
    """Probe one runtime by importing it (the only proof that it works in this process)."""
    module, _ = _module(name)
    if module is None:
        return Runtime(name, None)
    try:
        importlib.import_module(module)
    except ImportError:
        return Runtime(name, None)
    except Exception as exc:  # noqa: BLE001 - a broken install raises anything (SystemError, OSError)
        return Runtime(name, _dist_version(name) or "?", f"does not import ({type(exc).__name__}: {exc})")
    top = importlib.import_module(module.split(".")[0])
    version = getattr(top, "__version__", None) or _dist_version(name) or "?"
    if name == "tflite-runtime" and int(np.__version__.split(".")[0]) >= 2:
        return Runtime(name, version, f"tflite-runtime fails with NumPy {np.__version__}; install numpy<2")
    return Runtime(name, version)


def runtime_for(m: Manifest, arch: str) -> Runtime:
    """The installed runtime that will run ``m`` here, or a RuntimeMissingError saying what to do."""
    tried = []
    for name in RUNS_ON[m.runtime]:
        r = runtime(name)
        if r.usable:
            return r
        tried.append(r)
    why = no_wheels(m.runtime, arch)
    if why:
        raise RuntimeMissingError(f"{m.id} needs {m.runtime}, but {why}")
    broken = [f"{r.name} {r.version}: {r.problem}" for r in tried if r.problem]
    hint = _module(m.runtime)[1] or f"pip install {DISTS.get(m.runtime, m.runtime)}"
    raise RuntimeMissingError(f"{m.id} needs {m.runtime} {m.runtime_min_version} or newer, which is not "
                              f"installed{' (' + '; '.join(broken) + ')' if broken else ''}; {hint}")


def problems(m: Manifest, arch: str, profile: str | None = None, state_dir: Path | None = None,
             reserve: int = 16 << 20) -> dict[str, AgentError]:
    """Why this device cannot take ``m``, by check: arch, profile (when the device is configured as one),
    runtime (installed, and its version and NumPy constraint when ``m`` runs in the runtime it was built
    for), delegate and, with ``state_dir``, free disk (the files + ``reserve``). Empty: it can."""
    out: dict[str, AgentError] = {}
    if m.arch != arch:
        out["arch"] = CompatibilityError(
            f"{m.id} is built for {m.arch} (profile {m.profile}, {m.runtime}); this device is {arch}: "
            f"build it with a profile for {arch}{' such as rpi3-armv7' if arch == 'armv7l' else ''}")
    if profile and m.profile != profile:
        out["profile"] = CompatibilityError(f"{m.id} is built for profile {m.profile!r}; this device is "
                                            f"configured as {profile!r} (agent.profile)")
    want = (m.data.get("runtime") or {})
    try:
        r = runtime_for(m, arch)
        if r.name == m.runtime:  # a substitute (LiteRT for tflite-runtime) has its own versions
            if not at_least(r.version, m.runtime_min_version):
                out["runtime"] = RuntimeMissingError(f"{m.id} needs {m.runtime} {m.runtime_min_version} or newer; "
                                                     f"this device has {r.version}")
            spec = want.get("numpy")
            if isinstance(spec, str) and spec and not satisfies(np.__version__, spec):
                out["numpy"] = CompatibilityError(f"{m.id} runs in {m.runtime}, which needs numpy {spec} "
                                                  f"(runtime.numpy); this device has numpy {np.__version__}")
    except RuntimeMissingError as exc:
        out["runtime"] = exc
    delegate = str(want.get("delegate") or "none").lower()
    if delegate not in BUILTIN_DELEGATES:
        lib = DELEGATE_LIBRARIES.get(delegate)
        if lib is None:
            out["delegate"] = CompatibilityError(f"{m.id} needs the {delegate!r} delegate, which this agent "
                                                 f"does not know")
        else:
            try:
                ctypes.CDLL(lib[0])
            except OSError as exc:
                out["delegate"] = RuntimeMissingError(f"{m.id} needs the {delegate} delegate, but {lib[0]} cannot "
                                                      f"be loaded ({exc}); {lib[1]}")
    if state_dir is not None:
        need, free = sum(f.size for f in m.files) + reserve, free_bytes(state_dir)
        if free is not None and free < need:
            out["disk"] = StorageError(f"{m.id} needs {need / 1e6:.1f} MB free in {state_dir} to install; "
                                       f"{free / 1e6:.1f} MB are free")
    return out


def satisfies(version: str, spec: str) -> bool:
    """Does ``version`` meet a constraint such as ``"<2"`` or ``">=1.24,<2"``? Unparsable: False."""
    try:
        have = _vtuple(version)
        for clause in filter(None, (c.strip() for c in spec.split(","))):
            match = _CLAUSE.match(clause)
            if not match:
                return False
            op, want = match.group(1), _vtuple(match.group(2))
            n = max(len(have), len(want))
            a, b = have + (0,) * (n - len(have)), want + (0,) * (n - len(want))
            ok = {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b, "!=": a != b}[op]
            if not ok:
                return False
        return True
    except ValueError:
        return False


def at_least(version: str | None, minimum: str) -> bool:
    return version is not None and satisfies(version, f">={minimum}")


def free_bytes(folder: Path) -> int | None:
    """Free disk where ``folder`` is (or would be created)."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def time_sync() -> tuple[str, str]:
    """("yes" | "no" | "unknown", how it was found out)."""
    exe = shutil.which("timedatectl")
    if exe:
        try:
            out = subprocess.run([exe, "show", "-p", "NTPSynchronized", "--value"], capture_output=True,
                                 text=True, timeout=5)
            if out.returncode == 0 and out.stdout.strip() in ("yes", "no"):
                return out.stdout.strip(), "timedatectl"
        except (OSError, subprocess.SubprocessError):
            pass
    try:  # adjtimex(2) with modes = 0 only reads the kernel clock state; TIME_ERROR (5) = unsynchronized
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(512)  # >= sizeof(struct timex) on every arch; zeroed modes
        state = libc.adjtimex(buf)
    except (OSError, AttributeError):
        return "unknown", "no timedatectl, adjtimex unavailable"
    if state < 0:
        return "unknown", f"adjtimex failed (errno {ctypes.get_errno()})"
    return ("no" if state == 5 else "yes"), "kernel clock state (adjtimex)"


@dataclass(frozen=True)
class Facts:
    arch: str
    python: str
    numpy: str
    runtimes: tuple[Runtime, ...]
    zstandard: str | None
    state_dir: str | None
    free_bytes: int | None
    time_sync: str
    time_sync_source: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["runtimes"] = {r.name: {"version": r.version, "usable": r.usable, "problem": r.problem,
                                  "no_wheels": no_wheels(r.name, self.arch)} for r in self.runtimes}
        return d


def probe(state_dir: Path | None = None, arch: str | None = None) -> Facts:
    """Everything `edgeship-agent doctor` reports about this device."""
    arch = arch or platform.machine()
    try:
        import zstandard

        zstd: str | None = zstandard.__version__
    except ImportError:
        zstd = None
    sync, source = time_sync()
    return Facts(arch=arch, python=platform.python_version(), numpy=np.__version__,
                 runtimes=tuple(runtime(n) for n in DEVICE_RUNTIMES), zstandard=zstd,
                 state_dir=str(state_dir) if state_dir else None,
                 free_bytes=free_bytes(state_dir) if state_dir else None, time_sync=sync,
                 time_sync_source=source)


def _module(name: str) -> tuple[str | None, str | None]:
    """(module to import, install hint): TFLite interpreters from agent.runtime's table (its load order)."""
    if name == "onnxruntime":
        return "onnxruntime", "pip install onnxruntime"
    return next(((mod, hint) for n, mod, hint in rt.TFLITE_RUNTIMES if n == name), (None, None))


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(DISTS.get(name, name))
    except metadata.PackageNotFoundError:
        return None


def _vtuple(v: str) -> tuple[int, ...]:
    parts = tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])
    if not parts:
        raise ValueError(f"not a version: {v!r}")
    return parts
