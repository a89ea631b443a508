"""Open Inference Protocol v2 (KServe / Triton) messages: tensors in JSON and in the binary tensor data
extension, model metadata and configuration, and the classification extension.

Binary tensor data (what ``tritonclient`` sends by default): the body starts with a JSON header of
``Inference-Header-Content-Length`` bytes; each input with ``"parameters": {"binary_data_size": n}``
takes the next ``n`` bytes, in input order, little-endian, row-major. Outputs are binary when the output
asks for ``"binary_data": true`` or the request for ``"binary_data_output": true``, and come back the
same way. Every count, size and shape from the client is checked before anything is allocated.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.errors import HTTPError
from agent.manifest import Manifest, TensorSpec
from agent.serve.sequences import Sequence

DATATYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
             "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "float16",
             "FP32": "float32", "FP64": "float64"}
_NAMES = {v: k for k, v in DATATYPES.items()}
MAX_REQUEST_ID = 128  # characters (agent.capture.feedback.MAX_ID: feedback names requests by it)
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "parameters", "sequence", "statistics"]
MAX_DIMS = 32


def datatype(spec: TensorSpec) -> str:
    """The v2 datatype a tensor has at the API: quantized tensors speak FP32 (the agent (de)quantizes)."""
    return "FP32" if spec.quantized else _NAMES.get(np.dtype(spec.dtype).name, "FP32")


def _dtype(spec: TensorSpec) -> np.dtype:
    return np.dtype(DATATYPES[datatype(spec)]).newbyteorder("<")


@dataclass(frozen=True)
class Wanted:
    """One requested output."""

    name: str
    binary: bool
    classes: int = 0


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: tuple[Wanted, ...]
    sequence: Sequence | None
    outputs_asked: bool = False  # the request listed its outputs (else: the model's visible ones)


def parse_infer(body: bytes, header_length: str | None, inputs: tuple[TensorSpec, ...],
                outputs: tuple[TensorSpec, ...], default_outputs: tuple[TensorSpec, ...] | None = None) -> InferRequest:
    """A v2 inference request against the inputs and outputs a client may name; without ``outputs`` in the
    request it gets ``default_outputs`` (the visible ones). HTTPError 400 when malformed."""
    n = len(body)
    if header_length is not None:
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > n:
            raise HTTPError(400, f"Inference-Header-Content-Length {header_length!r} is not a length within "
                                 f"the {n}-byte body")
        n = int(header_length)
    req = loads(body[:n])
    if not isinstance(req, dict):
        raise HTTPError(400, 'expected a JSON object {"inputs": [...]}')
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise HTTPError(400, f"id: expected a string, got {type(rid).__name__}")
    if rid is not None and len(rid) > MAX_REQUEST_ID:  # it is echoed, remembered for feedback and captured
        raise HTTPError(400, f"id: at most {MAX_REQUEST_ID} characters, got {len(rid)}")
    rid = rid or None  # "": no id
    params = _params(req, "parameters")
    binary_out = params.get("binary_data_output", False)
    if not isinstance(binary_out, bool):
        raise HTTPError(400, "parameters.binary_data_output: expected true or false")
    seq = Sequence.parse(params)
    specs = {s.name: s for s in inputs}
    tensors = req.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise HTTPError(400, 'inputs: expected a non-empty list [{"name", "shape", "datatype", "data"}, ...]')
    raw = memoryview(body)[n:]
    offset = 0
    feed: dict[str, np.ndarray] = {}
    for i, t in enumerate(tensors):
        where = f"inputs[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise HTTPError(400, f"{where}: expected an object with a string name")
        name = t["name"]
        where = f"{where} {name!r}"
        spec = specs.get(name)
        if spec is None:
            raise HTTPError(400, f"{where}: not an input of this model; inputs are {list(specs)}")
        if name in feed:
            raise HTTPError(400, f"{where}: given twice")
        want = datatype(spec)
        if t.get("datatype") != want:
            raise HTTPError(400, f"{where}: datatype {t.get('datatype')!r} does not match the model's {want}")
        shape = _shape(t.get("shape"), where)
        count = _count(shape)
        size = _params(t, "parameters", where).get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise HTTPError(400, f"{where}: parameters.binary_data_size must be a non-negative integer")
            dt = _dtype(spec)
            if size != count * dt.itemsize:
                raise HTTPError(400, f"{where}: binary_data_size {size} does not match shape {shape} of {want} "
                                     f"({count * dt.itemsize} bytes)")
            if offset + size > len(raw):
                raise HTTPError(400, f"{where}: binary data ends after {len(raw) - offset} of {size} bytes")
            a = _from_binary(raw[offset:offset + size], dt, shape)
            offset += size
        elif "data" in t:
            a = _from_json(t["data"], want, shape, count, where)
        else:
            raise HTTPError(400, f"{where}: needs data, or parameters.binary_data_size with binary data")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise HTTPError(400, f"{where}: NaN/Inf values are not allowed")
        feed[name] = a
    if offset != len(raw):
        raise HTTPError(400, f"{len(raw) - offset} bytes of binary data after the declared input tensors")
    return InferRequest(rid, feed, _wanted(req, outputs, binary_out, default_outputs), seq,
                        req.get("outputs") is not None)


def encode_infer(manifest: Manifest, outputs: tuple[TensorSpec, ...], req: InferRequest,
                 out: dict[str, np.ndarray]) -> tuple[bytes, list[memoryview]]:
    """The response JSON and its binary parts (empty when every output is in JSON)."""
    specs = {s.name: s for s in outputs}
    entries, parts = [], []
    for w in req.outputs:
        a = out[w.name]
        if w.classes:
            a, dt = classify(a, w.classes, manifest.labels), "BYTES"
        else:
            dt = datatype(specs[w.name])
            a = np.ascontiguousarray(a, dtype=np.dtype(DATATYPES[dt]).newbyteorder("<"))
        e: dict[str, Any] = {"name": w.name, "datatype": dt, "shape": list(a.shape)}
        if w.binary:
            buf = _bytes_tensor(a) if dt == "BYTES" else memoryview(a).cast("B")
            e["parameters"] = {"binary_data_size": len(buf)}
            parts.append(memoryview(buf))
        else:
            e["data"] = [s.decode() for s in a.ravel()] if dt == "BYTES" else a.ravel().tolist()
        entries.append(e)
    doc: dict[str, Any] = {"model_name": manifest.name, "model_version": str(manifest.version), "outputs": entries}
    if req.id is not None:
        doc["id"] = req.id
    if req.sequence is not None:
        s = req.sequence
        doc["parameters"] = {"sequence_id": s.id, "sequence_start": s.start, "sequence_end": s.end}
    return dumps(doc), parts


def classify(a: np.ndarray, k: int, labels: tuple[str, ...]) -> np.ndarray:
    """Classification extension: the top ``k`` classes per sample as "score:index[:label]" strings."""
    rows = a.reshape(a.shape[0] if a.ndim > 1 else 1, -1).astype(np.float64)
    k = min(k, rows.shape[1])
    top = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    lab = labels if len(labels) == rows.shape[1] else ()
    return np.array([[f"{r[i]:f}:{i}{':' + lab[i] if lab else ''}".encode() for i in idx]
                     for r, idx in zip(rows, top)], dtype=object)


def metadata(manifest: Manifest, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> dict:
    t = lambda s: {"name": s.name, "datatype": datatype(s), "shape": list(s.shape)}  # noqa: E731
    return {"name": manifest.name, "versions": [str(manifest.version)],
            "platform": "tensorflow_lite" if manifest.format == "tflite" else "onnxruntime_onnx",
            "inputs": [t(s) for s in inputs], "outputs": [t(s) for s in outputs]}


def config(manifest: Manifest, runner: Any, interpreters: int) -> dict:
    """Triton's model configuration (``GET /v2/models/{name}/config``): full shapes, no server batching."""
    t = lambda s: {"name": s.name, "data_type": f"TYPE_{datatype(s)}", "dims": list(s.shape)}  # noqa: E731
    doc: dict[str, Any] = {
        "name": manifest.name, "platform": "tensorflow_lite" if manifest.format == "tflite" else "onnxruntime_onnx",
        "backend": "tflite" if manifest.format == "tflite" else "onnxruntime", "runtime": manifest.runtime,
        "version_policy": {"specific": {"versions": [manifest.version]}}, "max_batch_size": 0,
        "input": [t(s) for s in runner.inputs], "output": [t(s) for s in runner.outputs],
        "instance_group": [{"name": f"{manifest.name}_0", "count": interpreters, "kind": "KIND_CPU"}],
        "parameters": {"precision": {"string_value": manifest.precision}},
    }
    if manifest.labels:
        doc["parameters"]["labels"] = {"string_value": ",".join(manifest.labels)}
    if runner.plan.stateful:
        seq = runner.sequences
        doc["sequence_batching"] = {
            "max_sequence_idle_microseconds": int(seq.idle_timeout * 1e6), "max_live_sequences": seq.max_live,
            "state": [{"input_name": i.name, "output_name": o.name, "data_type": f"TYPE_{datatype(i)}",
                       "dims": list(i.shape)} for i, o in runner.plan.pairs]}
    return doc


def loads(raw: bytes | memoryview) -> Any:
    """Strict JSON: no NaN/Infinity literals; deep nesting and bad bytes are a 400, never a 500."""
    try:  # UTF-8 only: json.loads would guess UTF-16/32 from the bytes, which no client means
        return json.loads(bytes(raw).decode("utf-8"), parse_constant=_no_constant)
    except RecursionError as exc:
        raise HTTPError(400, "malformed JSON body (nested too deeply)") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise HTTPError(400, f"malformed JSON body ({exc})") from exc


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number in JSON")


def _params(d: dict, key: str, where: str = "") -> dict:
    p = d.get(key, {})
    if p is None:
        p = {}
    if not isinstance(p, dict):
        raise HTTPError(400, f"{where + '.' if where else ''}{key}: expected an object")
    return p


def _shape(shape: Any, where: str) -> list[int]:
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise HTTPError(400, f"{where}: shape must be a list of at most {MAX_DIMS} non-negative integers")
    return shape


def _count(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _from_binary(buf: memoryview, dt: np.dtype, shape: list[int]) -> np.ndarray:
    if dt.kind == "b":
        return np.frombuffer(buf, np.uint8).astype(bool).reshape(shape)
    return np.frombuffer(buf, dt).reshape(shape)


_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}


def _from_json(data: Any, dt_name: str, shape: list[int], count: int, where: str) -> np.ndarray:
    dt = np.dtype(DATATYPES[dt_name])
    try:
        a = np.array(data)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise HTTPError(400, f"{where}: data is not a (nested) list of numbers ({type(exc).__name__})") from exc
    if a.ndim > MAX_DIMS:
        raise HTTPError(400, f"{where}: data is nested deeper than {MAX_DIMS} levels")
    if a.dtype.kind == "O" or (dt.kind in "iu" and a.dtype.kind == "f"):  # ragged, or ints beyond int64
        try:
            vals = list(np.array(data, dtype=object).ravel())
        except ValueError as exc:
            raise HTTPError(400, f"{where}: data is not a (nested) list of numbers of equal lengths") from exc
        ints = [v for v in vals if isinstance(v, int) and not isinstance(v, bool)]
        if dt.kind in "iu" and ints and len(ints) == len(vals):
            info = np.iinfo(dt)
            bad = next((v for v in ints if not info.min <= v <= info.max), None)
            if bad is not None:
                raise HTTPError(400, f"{where}: value {bad} is out of range for {dt_name}")
            a = np.array(ints, dtype=dt)
        elif a.dtype.kind == "O":
            raise HTTPError(400, f"{where}: data is not a (nested) list of numbers of equal lengths")
    if a.size != count:
        raise HTTPError(400, f"{where}: data has {a.size} values; shape {shape} needs {count}")
    if count and a.dtype.kind not in _KINDS[dt.kind]:
        raise HTTPError(400, f"{where}: {dt_name} data must be "
                             f"{'true/false' if dt.kind == 'b' else 'integers' if dt.kind in 'iu' else 'numbers'}")
    if count and dt.kind in "iu":
        info = np.iinfo(dt)
        lo, hi = int(a.min()), int(a.max())
        if lo < info.min or hi > info.max:
            raise HTTPError(400, f"{where}: value {lo if lo < info.min else hi} is out of range for {dt_name}")
    if count and dt.kind == "f" and a.dtype.kind == "f" and dt.itemsize < a.dtype.itemsize:
        big = np.abs(a[np.isfinite(a)]).max(initial=0)
        if big > np.finfo(dt).max:
            raise HTTPError(400, f"{where}: value {big:g} is out of range for {dt_name}")
    return a.astype(dt).reshape(shape)


def _wanted(req: dict, outputs: tuple[TensorSpec, ...], binary_default: bool,
            default: tuple[TensorSpec, ...] | None = None) -> tuple[Wanted, ...]:
    names = [s.name for s in outputs]
    asked = req.get("outputs")
    if asked is None:
        return tuple(Wanted(s.name, binary_default) for s in (outputs if default is None else default))
    if not isinstance(asked, list):
        raise HTTPError(400, f'outputs: expected a list [{{"name": ...}}], got {type(asked).__name__}')
    res = []
    for i, o in enumerate(asked):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise HTTPError(400, f"outputs[{i}]: expected an object with a string name")
        if o["name"] not in names:
            raise HTTPError(400, f"outputs[{i}]: unknown output {o['name']!r}; model outputs are {names}")
        p = _params(o, "parameters", f"outputs[{i}]")
        binary, classes = p.get("binary_data", binary_default), p.get("classification", 0)
        if not isinstance(binary, bool):
            raise HTTPError(400, f"outputs[{i}].parameters.binary_data: expected true or false")
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 0:
            raise HTTPError(400, f"outputs[{i}].parameters.classification: expected a non-negative integer")
        res.append(Wanted(o["name"], binary, classes))
    return tuple(res)


def _bytes_tensor(a: np.ndarray) -> bytes:
    return b"".join(struct.pack("<I", len(s)) + s for s in a.ravel())
