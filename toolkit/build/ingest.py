"""Load the user's model: Keras (.keras/.h5), SavedModel folder, ONNX or TFLite.

A SourceModel knows its inputs/outputs and can run itself to give the fp32 reference outputs, with
N samples laid out as ``agent.layout`` says. Inputs of any numeric dtype are accepted (float, int,
bool); anything unreadable becomes an InputError naming the file, with the library's whole message.
Keras Lambda layers run Python code stored in the file: they load only with ``unsafe=True``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.layout import BATCH, join, layout_of, samples
from agent.manifest import DTYPES
from toolkit.errors import InputError
from toolkit.tfenv import import_keras, import_tf

KINDS = {".keras": "keras", ".h5": "keras", ".hdf5": "keras", ".onnx": "onnx", ".tflite": "tflite"}
UNSAFE_FLAG = "--unsafe-deserialization"


@dataclass(frozen=True)
class IOSpec:
    name: str
    shape: tuple[int, ...]  # -1 = any size (batch or dynamic)
    dtype: str
    quant: tuple[float, int, str] | None = None  # a quantized .tflite tensor: (scale, zero point, storage dtype)


@dataclass
class SourceModel:
    kind: str
    path: Path
    sha256: str
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    handle: Any = field(default=None, repr=False)  # tf_keras.Model / loaded SavedModel / ORT / Model

    @property
    def is_tf(self) -> bool:
        return self.kind in ("keras", "savedmodel")

    @property
    def layout(self) -> str:
        return layout_of([s.shape for s in self.inputs])

    def predict(self, arrays: list[np.ndarray], batch: int = 256) -> list[np.ndarray]:
        """Reference outputs in ``outputs`` order: float outputs as float32, integer ones as they are."""
        n = arrays[0].shape[0]
        parts = [self._predict([a[i:i + batch] for a in arrays]) for i in range(0, n, batch)]
        return [np.concatenate([p[s.name] for p in parts]) for s in self.outputs]

    def _predict(self, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        if not self.is_tf:  # ONNX Runtime / TFLite through the agent's runtime layer
            return self.handle.predict(arrays)
        if self.layout == BATCH and all(s.shape[0] == -1 for s in self.inputs):
            return self._tf_call(arrays)
        return join([self._tf_call(feed) for feed in samples(arrays, self.layout)], self.layout)

    def _tf_call(self, feed: list[np.ndarray]) -> dict[str, np.ndarray]:
        if self.kind == "keras":
            out = self.handle(feed if len(feed) > 1 else feed[0], training=False)
            out = out if isinstance(out, (list, tuple)) else [out]
            res = dict(zip([s.name for s in self.outputs], out))
        else:
            tf = import_tf()
            sig = self.handle.signatures["serving_default"]
            res = sig(**{s.name: tf.constant(a, dtype=s.dtype) for s, a in zip(self.inputs, feed)})
        return {s.name: _out(res[s.name]) for s in self.outputs}


def _out(x: Any) -> np.ndarray:
    a = np.asarray(x)
    return a.astype(np.float32) if a.dtype.kind == "f" else a


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def load_source(path: str | Path, unsafe: bool = False) -> SourceModel:
    """Load a model; ``unsafe`` allows Keras Lambda layers (Python code from the file is run)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: model not found")
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise InputError(f"{path}: a folder must be a TensorFlow SavedModel (no saved_model.pb)")
        kind = "savedmodel"
    else:
        kind = KINDS.get(path.suffix.lower(), "")
        if not kind:
            raise InputError(f"{path}: unsupported model format {path.suffix!r}; give a Keras "
                             f"(.keras/.h5), SavedModel folder, ONNX (.onnx) or TFLite (.tflite) model")
    loader = {"keras": _keras, "savedmodel": _savedmodel, "onnx": _onnx, "tflite": _tflite}[kind]
    try:
        handle, inputs, outputs = loader(path, unsafe) if kind == "keras" else loader(path)
    except InputError:
        raise
    except Exception as exc:  # each library has its own error types; map them once, here
        text = " ".join(str(exc).split()) or type(exc).__name__
        if "safe_mode" in text and "Lambda" in text:
            text += f" (edgeship: pass {UNSAFE_FLAG} to allow it)"
        raise InputError(f"{path}: cannot load as {kind} model ({text})") from exc
    for s in inputs + outputs:
        if s.dtype not in DTYPES and s.dtype != "float64":
            raise InputError(f"{path}: tensor {s.name!r} has dtype {s.dtype}; edgeship handles numeric "
                             f"tensors ({', '.join(DTYPES)})")
    return SourceModel(kind, path, file_sha256(path), inputs, outputs, handle)


def _dims(shape: Any) -> tuple[int, ...]:
    return tuple(-1 if d is None or not isinstance(d, int) or d < 0 else int(d) for d in shape)


def _keras(path: Path, unsafe: bool):
    keras = import_keras()
    if not unsafe and path.suffix.lower() in (".h5", ".hdf5"):
        _refuse_h5_lambda(path)  # tf_keras has no safe mode for HDF5: it would run the code unasked
    model = keras.models.load_model(str(path), compile=False, safe_mode=not unsafe)
    ins = [IOSpec(n, _dims(t.shape), t.dtype.name) for n, t in zip(model.input_names, model.inputs)]
    outs = [IOSpec(n, _dims(t.shape), t.dtype.name) for n, t in zip(model.output_names, model.outputs)]
    return model, ins, outs


def _refuse_h5_lambda(path: Path) -> None:
    import json

    import h5py

    with h5py.File(path, "r") as f:
        raw = f.attrs.get("model_config")
    if raw is None:
        return
    config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("class_name") == "Lambda":
                found.append(str((node.get("config") or {}).get("name", "?")))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(config)
    if found:
        raise InputError(f"{path}: cannot load as keras model (Lambda layer(s) {', '.join(found)} hold "
                         f"Python code that loading would run; if you trust this file, pass {UNSAFE_FLAG})")


def _savedmodel(path: Path):
    tf = import_tf()
    obj = tf.saved_model.load(str(path))
    if "serving_default" not in obj.signatures:
        raise InputError(f"{path}: SavedModel has no 'serving_default' signature")
    sig = obj.signatures["serving_default"]
    specs = sig.structured_input_signature[1]
    ins = [IOSpec(n, _dims(specs[n].shape), specs[n].dtype.name) for n in sorted(specs)]
    outs = [IOSpec(n, _dims(t.shape), t.dtype.name) for n, t in sorted(sig.structured_outputs.items())]
    return obj, ins, outs


def _onnx(path: Path):
    import os

    import onnx

    from agent.runtime import ONNX_DTYPES, load_model

    onnx.checker.check_model(str(path))
    model = load_model(path, threads=os.cpu_count() or 1)  # ONNX Runtime, with the agent's sample layout
    sess = model._sess  # noqa: SLF001 - read the raw types: the agent maps unknown ones to float32
    unknown = [t for t in sess.get_inputs() + sess.get_outputs() if t.type not in ONNX_DTYPES]
    if unknown:
        raise InputError(f"{path}: tensor {unknown[0].name!r} has type {unknown[0].type}; edgeship handles "
                         f"numeric tensors ({', '.join(sorted(set(ONNX_DTYPES.values())))})")
    spec = lambda t: IOSpec(t.name, t.shape, t.dtype)  # noqa: E731
    return model, [spec(t) for t in model.inputs], [spec(t) for t in model.outputs]


def _tflite(path: Path):
    from agent.runtime import load_model

    model = load_model(path)
    spec = lambda t: (IOSpec(t.name, t.shape, "float32", (t.scale, t.zero_point, t.dtype)) if t.quantized  # noqa: E731
                      else IOSpec(t.name, t.shape, t.dtype))
    return model, [spec(t) for t in model.inputs], [spec(t) for t in model.outputs]
