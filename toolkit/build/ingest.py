"""Load the user's model: Keras (.keras/.h5), SavedModel folder, ONNX or TFLite.

A SourceModel knows its inputs/outputs and can run itself to give the fp32 reference outputs.
Anything unreadable becomes an InputError naming the file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import InputError
from toolkit.tfenv import import_keras, import_tf

KINDS = {".keras": "keras", ".h5": "keras", ".hdf5": "keras", ".onnx": "onnx", ".tflite": "tflite"}


@dataclass(frozen=True)
class IOSpec:
    name: str
    shape: tuple[int, ...]  # -1 = any size (batch or dynamic)
    dtype: str


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

    def predict(self, arrays: list[np.ndarray], batch: int = 256) -> list[np.ndarray]:
        """fp32 reference outputs, in ``outputs`` order."""
        n = arrays[0].shape[0]
        parts = [self._predict([a[i:i + batch] for a in arrays]) for i in range(0, n, batch)]
        return [np.concatenate([p[k] for p in parts]) for k in range(len(self.outputs))]

    def _predict(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        if self.kind == "keras":
            out = self.handle(arrays if len(arrays) > 1 else arrays[0], training=False)
            out = out if isinstance(out, (list, tuple)) else [out]
            return [np.asarray(o, np.float32) for o in out]
        if self.kind == "savedmodel":
            tf = import_tf()
            sig = self.handle.signatures["serving_default"]
            res = sig(**{s.name: tf.constant(a, dtype=s.dtype) for s, a in zip(self.inputs, arrays)})
            return [np.asarray(res[s.name], np.float32) for s in self.outputs]
        if self.kind == "onnx":
            res = self.handle.run(None, {s.name: a.astype(s.dtype) for s, a in zip(self.inputs, arrays)})
            return [np.asarray(r, np.float32) for r in res]
        res = self.handle.predict(arrays)
        return [np.asarray(res[s.name], np.float32) for s in self.outputs]


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


def load_source(path: str | Path) -> SourceModel:
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
        handle, inputs, outputs = loader(path)
    except InputError:
        raise
    except Exception as exc:  # each library has its own error types; map them once, here
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: cannot load as {kind} model ({first})") from exc
    for s in inputs:
        if s.dtype not in ("float32", "float16", "float64"):
            raise InputError(f"{path}: input {s.name!r} has dtype {s.dtype}; only float inputs are "
                             f"supported for optimization")
    return SourceModel(kind, path, file_sha256(path), inputs, outputs, handle)


def _dims(shape: Any) -> tuple[int, ...]:
    return tuple(-1 if d is None or not isinstance(d, int) or d < 0 else int(d) for d in shape)


def _keras(path: Path):
    keras = import_keras()
    model = keras.models.load_model(str(path), compile=False)
    ins = [IOSpec(n, _dims(t.shape), t.dtype.name) for n, t in zip(model.input_names, model.inputs)]
    outs = [IOSpec(n, _dims(t.shape), t.dtype.name) for n, t in zip(model.output_names, model.outputs)]
    return model, ins, outs


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
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    dt = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}
    ins = [IOSpec(t.name, _dims(t.shape), dt.get(t.type, t.type)) for t in sess.get_inputs()]
    outs = [IOSpec(t.name, _dims(t.shape), dt.get(t.type, t.type)) for t in sess.get_outputs()]
    return sess, ins, outs


def _tflite(path: Path):
    from agent.runtime import load_model

    model = load_model(path)
    spec = lambda t: IOSpec(t.name, t.shape, "float32" if t.quantized else t.dtype)  # noqa: E731
    return model, [spec(t) for t in model.inputs], [spec(t) for t in model.outputs]
