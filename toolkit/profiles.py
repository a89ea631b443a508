"""Device profiles: what a target device can run, and what a model must achieve there.

Profiles are TOML files (schema in docs/profiles.md). They are looked up in ``--profiles-dir``,
``$EDGESHIP_PROFILES`` (``:``-separated), ``./device_profiles`` and the profiles shipped with edgeship.
Validation errors name the file and the key. Combinations that cannot exist are refused.

A device may have more than one runtime (a Raspberry Pi 4 runs LiteRT and ONNX Runtime): ``[runtime]``
is the first choice and ``[[runtime.alternatives]]`` lists the others. A build measures variants in
each runtime the source can go to and the profile's objective picks among all of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.manifest import ARCHES, RUNTIME_FORMATS, no_wheels
from toolkit.errors import ProfileError

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "device_profiles"
PRECISIONS = {
    "tflite": ("fp32", "fp16", "dynamic-int8", "int8", "int16x8"),
    "onnx": ("fp32", "fp16", "dynamic-int8", "int8"),
}
TFLITE_RUNTIME_LAST = (2, 14, 0)


@dataclass(frozen=True)
class Runtime:
    """One runtime a device has, with the precisions it accepts there."""

    name: str
    version: str
    threads: int
    delegate: str
    execution_providers: tuple[str, ...]
    max_opset: int | None
    numpy: str
    precisions: tuple[str, ...]
    int8_io: str

    @property
    def format(self) -> str:
        return RUNTIME_FORMATS[self.name]

    @property
    def edgetpu(self) -> bool:
        return self.delegate == "edgetpu"


@dataclass(frozen=True)
class Profile:
    """A validated device profile. ``runtimes[0]`` is the first choice; the flat ``runtime``,
    ``format``, ``precisions``... properties describe it (a one-runtime view: see ``only``)."""

    name: str
    description: str
    path: Path
    sha256: str
    arch: str
    cpu: str
    os: str
    python: str
    runtimes: tuple[Runtime, ...]
    max_model_mb: float
    max_ram_mb: float
    max_p95_ms: float
    device_slowdown: float
    max_accuracy_drop: float
    min_agreement: float
    min_snr_db: float
    objective: str

    def only(self, runtime: Runtime) -> "Profile":
        """This profile restricted to one of its runtimes (what a bundle is built for)."""
        return dataclasses.replace(self, runtimes=(runtime,))

    @property
    def primary(self) -> Runtime:
        return self.runtimes[0]

    runtime = property(lambda self: self.primary.name)
    runtime_version = property(lambda self: self.primary.version)
    threads = property(lambda self: self.primary.threads)
    delegate = property(lambda self: self.primary.delegate)
    execution_providers = property(lambda self: self.primary.execution_providers)
    max_opset = property(lambda self: self.primary.max_opset)
    numpy = property(lambda self: self.primary.numpy)
    precisions = property(lambda self: self.primary.precisions)
    int8_io = property(lambda self: self.primary.int8_io)
    format = property(lambda self: self.primary.format)
    edgetpu = property(lambda self: self.primary.edgetpu)

    def summary(self) -> dict[str, Any]:
        plain = lambda v: list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v  # noqa: E731
        out = {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "runtimes"}
        out["runtimes"] = [{**{k: plain(v) for k, v in dataclasses.asdict(rt).items()}, "format": rt.format}
                           for rt in self.runtimes]
        first = out["runtimes"][0]  # the first choice, flat, as profiles with one runtime always showed it
        out.update({"runtime": first["name"], "runtime_version": first["version"], "format": first["format"],
                    "edgetpu": self.edgetpu, **{k: first[k] for k in ("threads", "delegate", "execution_providers",
                                                                   "max_opset", "numpy", "precisions", "int8_io")}})
        return out

    def toml_doc(self) -> dict[str, Any]:
        """The profile under its TOML keys (docs/profiles.md), defaults filled in: what `profiles show` prints."""
        doc: dict[str, Any] = {}
        for field_name, dotted in TOML_KEYS.items():
            value = getattr(self, field_name)
            if value is None:
                continue  # TOML has no null: an unset optional key stays out
            *parents, leaf = dotted.split(".")
            cur = doc
            for part in parents:
                cur = cur.setdefault(part, {})
            cur[leaf] = list(value) if isinstance(value, tuple) else value
        return doc

    def to_toml(self) -> str:
        lines = [f"# {self.path} (sha256 {self.sha256[:16]}…), defaults filled in"]
        tables = {k: v for k, v in self.toml_doc().items() if isinstance(v, dict)}
        lines += [f"{k} = {_toml_value(v)}" for k, v in self.toml_doc().items() if not isinstance(v, dict)]
        for name, table in tables.items():
            lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        return "\n".join(lines) + "\n"


# Profile field -> TOML key (docs/profiles.md); path, sha256 and edgetpu are derived, not keys
TOML_KEYS = {
    "name": "name", "description": "description", "objective": "objective", "arch": "device.arch",
    "cpu": "device.cpu", "os": "device.os", "python": "device.python", "runtime": "runtime.name",
    "runtime_version": "runtime.version", "numpy": "runtime.numpy", "threads": "runtime.threads",
    "delegate": "runtime.delegate", "execution_providers": "runtime.execution_providers",
    "max_opset": "runtime.max_opset", "precisions": "precision.accepted", "int8_io": "precision.int8_io",
    "max_model_mb": "budgets.model_mb", "max_ram_mb": "budgets.ram_mb", "max_p95_ms": "budgets.p95_latency_ms",
    "device_slowdown": "budgets.device_slowdown", "max_accuracy_drop": "accuracy.max_drop_points",
    "min_agreement": "accuracy.min_top1_agreement", "min_snr_db": "accuracy.min_snr_db",
}


def _toml_value(v: Any) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)  # a TOML basic string is a JSON string


def search_dirs(extra: list[str | Path] | None = None, env: str | None = None) -> list[Path]:
    dirs = [Path(p) for p in (extra or [])]
    if env:
        dirs += [Path(p) for p in env.split(":") if p]
    dirs += [Path.cwd() / "device_profiles", BUILTIN_DIR]
    seen, out = set(), []
    for d in dirs:
        r = d.resolve()
        if r not in seen and r.is_dir():
            seen.add(r)
            out.append(d)
    return out


def list_profiles(dirs: list[Path]) -> list[Profile]:
    found: dict[str, Profile] = {}
    for d in dirs:
        for f in sorted(d.glob("*.toml")):
            if f.stem not in found:
                found[f.stem] = load_profile_file(f)
    return [found[k] for k in sorted(found)]


def find_profile(name_or_path: str, dirs: list[Path]) -> Profile:
    p = Path(name_or_path)
    if p.suffix == ".toml" or "/" in name_or_path:
        return load_profile_file(p)
    for d in dirs:
        f = d / f"{name_or_path}.toml"
        if f.is_file():
            return load_profile_file(f)
    known = sorted({f.stem for d in dirs for f in d.glob("*.toml")})
    raise ProfileError(f"unknown device profile {name_or_path!r}; known: {', '.join(known) or 'none'} "
                       f"(or pass a path to a .toml file)")


def load_profile_file(path: Path) -> Profile:
    if not path.is_file():
        raise ProfileError(f"{path}: profile file not found")
    raw = path.read_bytes()
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"{path}: not valid TOML ({exc})") from exc
    r = _Reader(path, doc)
    name = r.get("name", str)
    if name != path.stem:
        raise ProfileError(f"{path}: name: {name!r} must match the file name {path.stem!r}")
    arch = r.choice("device.arch", ARCHES)
    r.choice("runtime.name", tuple(RUNTIME_FORMATS))  # the first thing a reader of the file looks for
    accepted = tuple(r.get("precision.accepted", list))
    int8_io = r.choice("precision.int8_io", ("int8", "uint8", "float"), "int8")
    runtimes = [_runtime(r, "runtime", r.get("runtime", dict, {}), arch, None, accepted, int8_io)]
    alternatives = r.get("runtime.alternatives", list, [], items=dict)
    for i, alt in enumerate(alternatives):
        rt = _runtime(r, f"runtime.alternatives[{i}]", alt, arch, runtimes[0].threads, accepted, int8_io)
        if rt.name in {x.name for x in runtimes}:
            raise ProfileError(f"{path}: runtime.alternatives[{i}].name: {rt.name} is listed twice")
        runtimes.append(rt)
    offered = {p for rt in runtimes for p in PRECISIONS[rt.format]}
    bad = [p for p in accepted if p not in offered]
    if not accepted or bad:
        formats = " / ".join(sorted({rt.format for rt in runtimes}))
        raise ProfileError(f"{path}: precision.accepted: {bad or 'empty'} not valid for {formats} "
                           f"(choose from {', '.join(sorted(offered))})")
    for i, rt in enumerate(runtimes):
        if not rt.precisions:
            raise ProfileError(f"{path}: runtime.alternatives[{i - 1}]: none of precision.accepted is valid "
                               f"for {rt.name}; give it its own accepted = [...]")
    return Profile(
        name=name, description=r.get("description", str, ""), path=path,
        sha256=hashlib.sha256(raw).hexdigest(), arch=arch, cpu=r.get("device.cpu", str, ""),
        os=r.get("device.os", str, ""), python=r.get("device.python", str, "3.11"), runtimes=tuple(runtimes),
        max_model_mb=r.positive("budgets.model_mb"), max_ram_mb=r.positive("budgets.ram_mb"),
        max_p95_ms=r.positive("budgets.p95_latency_ms"),
        device_slowdown=r.positive("budgets.device_slowdown", 1.0),
        max_accuracy_drop=r.positive("accuracy.max_drop_points", 1.0),
        min_agreement=r.positive("accuracy.min_top1_agreement", 0.95),
        min_snr_db=r.positive("accuracy.min_snr_db", 20.0),
        objective=r.choice("objective", ("latency", "size", "preference"), "latency"),
    )


def _runtime(r: "_Reader", where: str, table: dict[str, Any], arch: str, threads: int | None,
             accepted: tuple[str, ...], int8_io: str) -> Runtime:
    """One runtime table (``[runtime]`` or an entry of ``[[runtime.alternatives]]``), validated;
    alternatives inherit the first runtime's ``threads``."""
    t = _Reader(r.path, table, where + ".")
    path = r.path
    runtime = t.choice("name", tuple(RUNTIME_FORMATS))
    version = t.get("version", str)
    fmt = RUNTIME_FORMATS[runtime]
    if why := no_wheels(runtime, arch):
        raise ProfileError(f"{path}: {where}.name: {why}")
    vt = _version_tuple(version, path, f"{where}.version")
    if runtime == "tflite-runtime" and vt > TFLITE_RUNTIME_LAST:
        raise ProfileError(f"{path}: {where}.version: tflite-runtime {version} does not exist "
                           f"(2.14.0 is the last release; newer devices use litert)")
    numpy = t.get("numpy", str, "")
    if runtime == "tflite-runtime" and vt >= (2, 14) and numpy and not numpy.startswith("<2") \
            and not numpy.startswith("<1"):
        raise ProfileError(f"{path}: {where}.numpy: tflite-runtime {version} fails with NumPy 2; "
                           f"set numpy = \"<2\"")
    max_opset = t.get("max_opset", int, None)
    if fmt == "onnx" and max_opset is None:
        raise ProfileError(f"{path}: {where}.max_opset: required for onnxruntime profiles")
    if max_opset is not None and not 7 <= max_opset <= 23:
        raise ProfileError(f"{path}: {where}.max_opset: {max_opset} is outside 7..23")
    own = t.get("accepted", list, None)
    precisions = tuple(own) if own is not None else tuple(p for p in accepted if p in PRECISIONS[fmt])
    bad = [p for p in precisions if p not in PRECISIONS[fmt]]
    if own is not None and (not precisions or bad):
        raise ProfileError(f"{path}: {where}.accepted: {bad or 'empty'} not valid for {runtime} ({fmt}: "
                           f"{', '.join(PRECISIONS[fmt])})")
    delegate = t.get("delegate", str, "none")
    if delegate == "edgetpu" and (set(precisions) != {"int8"} or int8_io == "float"):
        raise ProfileError(f"{path}: {where}.delegate: the Edge TPU runs only full-int8 models with "
                           f"integer I/O; set precision.accepted = [\"int8\"] and int8_io = \"uint8\"")
    rt_threads = t.get("threads", int) if threads is None else t.get("threads", int, threads)
    if rt_threads < 1:
        raise ProfileError(f"{path}: {where}.threads: must be >= 1")
    return Runtime(name=runtime, version=version, threads=rt_threads, delegate=delegate,
                   execution_providers=tuple(t.get("execution_providers", list, ["CPUExecutionProvider"])),
                   max_opset=max_opset, numpy=numpy, precisions=precisions, int8_io=int8_io)


class _Reader:
    _MISSING = object()

    def __init__(self, path: Path, doc: dict[str, Any], prefix: str = ""):
        self.path, self.doc, self.prefix = path, doc, prefix

    def get(self, dotted: str, typ: type, default: Any = _MISSING, items: type = str) -> Any:
        cur: Any = self.doc
        key = self.prefix + dotted
        for part in dotted.split("."):
            if not isinstance(cur, dict) or part not in cur:
                if default is self._MISSING:
                    raise ProfileError(f"{self.path}: {key}: required key is missing")
                return default
            cur = cur[part]
        ok = isinstance(cur, typ) and not (isinstance(cur, bool) and typ is not bool)
        if typ is float and isinstance(cur, int) and not isinstance(cur, bool):
            cur, ok = float(cur), True
        if not ok:
            raise ProfileError(f"{self.path}: {key}: expected {typ.__name__}, got {cur!r}")
        if typ is list and not all(isinstance(x, items) for x in cur):
            what = "strings" if items is str else "tables"
            raise ProfileError(f"{self.path}: {key}: expected a list of {what}")
        return cur

    def choice(self, dotted: str, options: tuple[str, ...], default: Any = _MISSING) -> str:
        v = self.get(dotted, str, default)
        if v not in options:
            raise ProfileError(f"{self.path}: {self.prefix}{dotted}: {v!r} is not one of {', '.join(options)}")
        return v

    def positive(self, dotted: str, default: Any = _MISSING) -> float:
        v = self.get(dotted, float, default)
        if v <= 0:
            raise ProfileError(f"{self.path}: {self.prefix}{dotted}: must be > 0, got {v}")
        return float(v)


def _version_tuple(v: str, path: Path, key: str = "runtime.version") -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in v.split("."))
    except ValueError as exc:
        raise ProfileError(f"{path}: {key}: {v!r} is not a dotted version") from exc
