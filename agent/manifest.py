"""The bundle manifest: schema, validation and canonical encoding.

The manifest is the signed heart of a bundle. ``canonical_json`` gives the exact bytes that are
signed, so the host and the device agree on them byte for byte. See docs/bundle.md for the schema.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from agent.errors import ManifestError

SCHEMA_VERSION = 1
SEALED_SCHEMA = 2  # schema 1 + an ``encryption`` block: the files are ciphertext (agent/seal.py)
FORMATS = {"tflite": ".tflite", "onnx": ".onnx"}
RUNTIME_FORMATS = {"litert": "tflite", "tflite-runtime": "tflite", "onnxruntime": "onnx"}
ARCHES = ("aarch64", "armv7l", "x86_64")
# Where each runtime's wheels exist (PyPI, Nov 2026). tflite-runtime 2.14.0 is its last release.
RUNTIME_ARCHES = {"litert": {"aarch64", "x86_64"}, "onnxruntime": {"aarch64", "x86_64"},
                  "tflite-runtime": {"aarch64", "armv7l", "x86_64"}}
DTYPES = ("float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def no_wheels(runtime: str, arch: str) -> str | None:
    """Why ``runtime`` cannot exist on ``arch`` (None when it can): one message for the toolkit's
    profile check and the agent's install check."""
    if arch in RUNTIME_ARCHES.get(runtime, {arch}):
        return None
    hint = "; on 32-bit ARM use tflite-runtime 2.14 (with numpy<2), e.g. the rpi3-armv7 profile" \
        if arch == "armv7l" else ""
    return f"{runtime} has no wheels for {arch}{hint}"


def valid_name(name: str) -> bool:
    """A model name a manifest accepts: 1-64 of letters, digits, '.', '_', '-', starting alphanumeric."""
    return bool(_NAME.match(name))


def canonical_json(data: dict[str, Any]) -> bytes:
    """The signed byte form of a manifest: sorted keys, no spaces, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the runtime sees it; the agent API always speaks float32."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    scale: float | None = None
    zero_point: int | None = None

    @property
    def quantized(self) -> bool:
        return self.scale is not None and self.scale != 0.0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.quantized:
            d["quantization"] = {"scale": self.scale, "zero_point": self.zero_point}
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "TensorSpec":
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected an object, got {type(d).__name__}")
        name = _get(d, "name", str, where)
        dtype = _get(d, "dtype", str, where)
        if dtype not in DTYPES:
            raise ManifestError(f"{where}.dtype: unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
        shape = _get(d, "shape", list, where)
        if not all(isinstance(s, int) and s >= -1 for s in shape):
            raise ManifestError(f"{where}.shape: expected a list of integers (-1 for dynamic), got {shape!r}")
        q = d.get("quantization")
        if q is None:
            return cls(name, dtype, tuple(shape))
        scale = _get(q, "scale", (int, float), f"{where}.quantization")
        zp = _get(q, "zero_point", int, f"{where}.quantization")
        return cls(name, dtype, tuple(shape), float(scale), zp)


@dataclass(frozen=True)
class FileEntry:
    """A file inside the bundle and the hash and size it must have."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. ``data`` keeps the full signed document, including free-form sections."""

    name: str
    version: int
    profile: str
    arch: str
    runtime: str
    runtime_min_version: str
    format: str
    precision: str
    threads: int
    model_file: str
    files: tuple[FileEntry, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    key_id: str
    golden: dict[str, Any] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    data: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise ManifestError(f"manifest.json: no file entry for {path!r}")

    @classmethod
    def from_dict(cls, d: Any) -> "Manifest":
        where = "manifest.json"
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected a JSON object")
        schema = _get(d, "schema", int, where)
        if schema not in (SCHEMA_VERSION, SEALED_SCHEMA):
            raise ManifestError(f"{where}.schema: version {schema} is not supported by this agent "
                                f"(supports {SCHEMA_VERSION} and {SEALED_SCHEMA}); upgrade edgeship-agent")
        if (schema == SEALED_SCHEMA) != ("encryption" in d):
            raise ManifestError(f"{where}: schema {SEALED_SCHEMA} (and only it) has an encryption block")
        name = _get(d, "name", str, where)
        if not _NAME.match(name):
            raise ManifestError(f"{where}.name: {name!r} is not a valid model name")
        version = _get(d, "version", int, where)
        if version < 1:
            raise ManifestError(f"{where}.version: must be >= 1, got {version}")
        arch = _get(d, "arch", str, where)
        if arch not in ARCHES:
            raise ManifestError(f"{where}.arch: unknown arch {arch!r} (one of {', '.join(ARCHES)})")
        rt = _get(d, "runtime", dict, where)
        runtime = _get(rt, "name", str, f"{where}.runtime")
        if runtime not in RUNTIME_FORMATS:
            raise ManifestError(f"{where}.runtime.name: unknown runtime {runtime!r}")
        fmt = _get(d, "format", str, where)
        if RUNTIME_FORMATS[runtime] != fmt:
            raise ManifestError(f"{where}.format: {fmt!r} cannot run on runtime {runtime!r}")
        files = []
        for i, f in enumerate(_get(d, "files", list, where)):
            w = f"{where}.files[{i}]"
            path = _get(f, "path", str, w)
            if not _NAME.match(path):
                raise ManifestError(f"{w}.path: {path!r} is not a plain file name")
            sha = _get(f, "sha256", str, w)
            if not _SHA256.match(sha):
                raise ManifestError(f"{w}.sha256: not a lowercase hex SHA-256")
            size = _get(f, "size", int, w)
            if size < 0:
                raise ManifestError(f"{w}.size: must be >= 0")
            files.append(FileEntry(path, sha, size))
        if len({f.path for f in files}) != len(files):
            raise ManifestError(f"{where}.files: duplicate paths")
        model = _get(d, "model", dict, where)
        model_file = _get(model, "path", str, f"{where}.model")
        if model_file not in {f.path for f in files}:
            raise ManifestError(f"{where}.model.path: {model_file!r} is not listed in files")
        if not model_file.endswith(FORMATS[fmt]):
            raise ManifestError(f"{where}.model.path: {model_file!r} does not end in {FORMATS[fmt]}")
        inputs = tuple(TensorSpec.from_dict(t, f"{where}.inputs[{i}]")
                       for i, t in enumerate(_get(d, "inputs", list, where)))
        outputs = tuple(TensorSpec.from_dict(t, f"{where}.outputs[{i}]")
                        for i, t in enumerate(_get(d, "outputs", list, where)))
        if not inputs or not outputs:
            raise ManifestError(f"{where}: a model needs at least one input and one output")
        golden = d.get("golden") or {}
        if golden:
            gpath = _get(golden, "path", str, f"{where}.golden")
            if gpath not in {f.path for f in files}:
                raise ManifestError(f"{where}.golden.path: {gpath!r} is not listed in files")
            for k in ("atol", "rtol"):
                v = _get(golden, k, (int, float), f"{where}.golden")
                if v < 0:
                    raise ManifestError(f"{where}.golden.{k}: must be >= 0")
        if schema == SEALED_SCHEMA:
            _check_sealed(d, files)
        labels = d.get("labels") or []
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ManifestError(f"{where}.labels: expected a list of strings")
        threads = rt.get("threads", 1)
        if not isinstance(threads, int) or threads < 1:
            raise ManifestError(f"{where}.runtime.threads: expected an integer >= 1")
        return cls(
            name=name, version=version, profile=_get(d, "profile", str, where), arch=arch,
            runtime=runtime, runtime_min_version=_get(rt, "min_version", str, f"{where}.runtime"),
            format=fmt, precision=_get(d, "precision", str, where), threads=threads,
            model_file=model_file, files=tuple(files), inputs=inputs, outputs=outputs,
            key_id=_get(d, "key_id", str, where), golden=dict(golden), labels=tuple(labels), data=d,
        )


def _check_sealed(d: dict[str, Any], files: list[FileEntry]) -> None:
    """Every file of a sealed bundle is sealed, and its ciphertext size is what its plaintext size gives."""
    from agent.seal import Sealing, sealed_size

    sealing = Sealing.of(d)
    assert sealing is not None
    entries = {f.path: f for f in files}
    if set(sealing.files) != set(entries):
        raise ManifestError("manifest.json.encryption.files: must name exactly the bundle's files")
    for path, (_, size) in sealing.files.items():
        if entries[path].size != sealed_size(size, sealing.segment):
            raise ManifestError(f"manifest.json.encryption.files.{path}: plaintext size {size} does not match "
                                f"the ciphertext's {entries[path].size} bytes")


def parse_manifest(raw: bytes) -> Manifest:
    """Parse and validate manifest bytes."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"manifest.json: not valid JSON ({exc})") from exc
    return Manifest.from_dict(data)


def _get(d: Any, key: str, typ: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: expected an object")
    if key not in d:
        raise ManifestError(f"{where}: missing required key {key!r}")
    v = d[key]
    if isinstance(v, bool) and typ is not bool or not isinstance(v, typ):
        expected = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise ManifestError(f"{where}.{key}: expected {expected}, got {type(v).__name__}")
    return v
