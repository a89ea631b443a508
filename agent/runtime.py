"""Load a .tflite or .onnx model in the best installed runtime and run it with float I/O.

TFLite models run in LiteRT (``ai_edge_litert``), else ``tflite_runtime``, else ``tensorflow.lite``
(development hosts only). ONNX models run in ONNX Runtime. Quantized inputs are quantized and
quantized outputs dequantized with each tensor's scale/zero-point, so callers speak float32 for every
float or quantized tensor; integer and bool tensors (token ids, lengths, a sample rate) keep their dtype.
N samples are laid out as ``agent.layout`` says (batch-first, or stacked for other models).
"""

from __future__ import annotations

import importlib
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from agent.errors import InputError, ModelError, RuntimeMissingError
from agent.layout import BATCH, describe, join, layout_of, sample_shape, samples
from agent.manifest import TensorSpec

TFLITE_RUNTIMES = (
    ("litert", "ai_edge_litert.interpreter", "pip install ai-edge-litert"),
    ("tflite-runtime", "tflite_runtime.interpreter", "pip install tflite-runtime (32-bit ARM, numpy<2)"),
    ("tensorflow", "tensorflow.lite", "pip install tensorflow (development hosts only)"),
)
ONNX_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8",
                "tensor(uint8)": "uint8", "tensor(int32)": "int32", "tensor(int64)": "int64",
                "tensor(bool)": "bool", "tensor(int16)": "int16"}
STATE_OPS = {"VAR_HANDLE", "ASSIGN_VARIABLE"}  # TFLite ops that keep resource variables across invokes


def tflite_interpreter_class(prefer: str | None = None) -> tuple[str, Any]:
    """The first importable TFLite interpreter (name, class); ``prefer`` tries one runtime first."""
    order = sorted(TFLITE_RUNTIMES, key=lambda r: r[0] != prefer)
    for name, module, _ in order:
        try:
            return name, importlib.import_module(module).Interpreter
        except ImportError:
            continue
    raise RuntimeMissingError("no TFLite runtime is installed; install one of: "
                              + "; ".join(hint for _, _, hint in TFLITE_RUNTIMES[:2]))


def quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Float array to the tensor's storage dtype (affine quantization when the tensor has it)."""
    dt = np.dtype(spec.dtype)
    if spec.quantized and dt.kind in "iu":
        info = np.iinfo(dt)
        buf = np.multiply(x, np.float32(1.0 / spec.scale), dtype=np.float32)  # one new buffer, in-place after
        np.add(buf, np.float32(spec.zero_point), out=buf)
        np.rint(buf, out=buf)
        np.clip(buf, info.min, info.max, out=buf)
        return buf.astype(dt)
    return np.asarray(x).astype(dt, copy=False)


def dequantize(q: np.ndarray, spec: TensorSpec) -> np.ndarray:
    if spec.quantized:
        return ((q.astype(np.float32) - np.float32(spec.zero_point)) * np.float32(spec.scale))
    return q.astype(np.float32, copy=False) if q.dtype.kind == "f" else q


class Model:
    """A loaded model. ``predict`` is thread-safe (calls are serialized per model).

    Inputs and outputs follow the sample layout of ``agent.layout`` (``self.layout``): axis 0 of every
    array counts samples. Models that can take a whole batch in one call get it; others (a fixed batch
    of 1, a batch axis that is not first, a scalar input) are called once per sample.
    """

    def __init__(self, path: Path, runtime: str, inputs: tuple[TensorSpec, ...],
                 outputs: tuple[TensorSpec, ...], whole_batch: bool = True):
        self.path, self.runtime = path, runtime
        self.inputs, self.outputs = inputs, outputs
        self.layout = layout_of([s.shape for s in inputs])
        self._whole_batch = self.layout == BATCH and whole_batch
        self._lock = threading.Lock()
        self._load_args: dict[str, Any] = {}  # set by load_model: how to make another instance

    def clone(self) -> "Model":
        """A new, independent instance of the same model file (own interpreter, own state)."""
        return load_model(self.path, **self._load_args)

    @property
    def stateful(self) -> bool:
        """True when the model keeps state between calls inside the runtime (TFLite resource variables)."""
        return self.runtime != "onnxruntime" and bool(STATE_OPS & set(self.ops()))

    def ops(self) -> list[str]:
        raise NotImplementedError

    def predict(self, feed: Mapping[str, Any] | Sequence[Any] | np.ndarray) -> dict[str, np.ndarray]:
        """Run N samples. ``feed`` is one array (single input), a list in input order, or a name map."""
        return self.run(self.arrange(feed))

    def run(self, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Run already-arranged inputs (see ``arrange``)."""
        with self._lock:
            if self.layout == BATCH and (self._whole_batch or arrays[0].shape[0] == 1):
                return self._call(arrays)
            return join([self._call(feed) for feed in samples(arrays, self.layout)], self.layout)

    def arrange(self, feed: Any) -> list[np.ndarray]:
        """Check ``feed`` against the model's inputs: arrays in input order, float32 for float and
        quantized inputs, the model's own dtype for integer and bool inputs, with a leading sample axis."""
        if isinstance(feed, Mapping):
            missing = [s.name for s in self.inputs if s.name not in feed]
            unknown = sorted(set(feed) - {s.name for s in self.inputs})
            if missing or unknown:
                raise InputError(f"inputs do not match model {self.path.name}: missing {missing}, "
                                 f"unknown {unknown}; expected {[s.name for s in self.inputs]}")
            feed = [feed[s.name] for s in self.inputs]
        elif isinstance(feed, np.ndarray) or not isinstance(feed, (list, tuple)):
            feed = [feed]
        if len(feed) != len(self.inputs):
            raise InputError(f"model {self.path.name} takes {len(self.inputs)} inputs, got {len(feed)}")
        out = []
        for spec, x in zip(self.inputs, feed):
            a = _as_input(x, spec)
            want = sample_shape(spec.shape, self.layout)
            if a.ndim == len(want):  # a single sample without its leading sample axis
                a = a[None]
            if a.ndim != len(want) + 1 or any(w not in (-1, g) for w, g in zip(want, a.shape[1:])):
                raise InputError(f"input {spec.name!r}: expected shape {describe(spec.shape, self.layout)}, "
                                 f"got {tuple(a.shape)}")
            out.append(a)
        counts = {a.shape[0] for a in out}
        if len(counts) > 1:
            raise InputError(f"inputs of model {self.path.name} hold different numbers of samples on axis 0 "
                             f"({', '.join(f'{s.name}: {a.shape[0]}' for s, a in zip(self.inputs, out))})")
        if counts == {0}:
            raise InputError(f"model {self.path.name}: no samples (axis 0 is empty)")
        return out

    def unstacked(self, feed: Any) -> bool:
        """True when ``feed`` is one sample of a stacked-layout model given exactly as the model takes it
        (no leading sample axis): its outputs then drop the sample axis too (the model's own shapes)."""
        if self.layout == BATCH:
            return False
        if isinstance(feed, Mapping):
            arrays = [feed.get(s.name) for s in self.inputs]
        elif isinstance(feed, np.ndarray) or not isinstance(feed, (list, tuple)):
            arrays = [feed]
        else:
            arrays = list(feed)
        return len(arrays) == len(self.inputs) and all(
            x is not None and np.ndim(x) == len(s.shape) for s, x in zip(self.inputs, arrays))

    def set_raw(self, arrays: list[np.ndarray]) -> None:
        """Load one arranged sample into the runtime for ``invoke`` (benchmarks)."""
        self._set_raw(arrays if self.layout == BATCH else [a[0] for a in arrays])

    def _call(self, feed: list[np.ndarray]) -> dict[str, np.ndarray]:
        """One runtime call with inputs exactly as the model takes them."""
        raise NotImplementedError

    def _set_raw(self, feed: list[np.ndarray]) -> None:
        raise NotImplementedError


def _as_input(x: Any, spec: TensorSpec) -> np.ndarray:
    """One input as an array: float32 for float and quantized tensors (the API speaks float; an array in
    a quantized tensor's own integer dtype holds raw quantized values and is dequantized), else the
    model's integer or bool dtype, refusing values that would change on the way (3.5, 300 for int8)."""
    dt = np.dtype(spec.dtype)
    try:
        if spec.quantized and dt.kind in "iu" and getattr(x, "dtype", None) == dt:
            return dequantize(np.asarray(x), spec)  # raw quantized values, as the runtime itself takes them
        if dt.kind == "f" or spec.quantized:
            return np.asarray(x, dtype=np.float32)
        a = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise InputError(f"input {spec.name!r}: not a numeric array ({exc})") from exc
    if a.dtype == dt:
        return a
    if a.dtype.kind not in "biuf":
        raise InputError(f"input {spec.name!r}: not a numeric array (got {a.dtype}); the model takes {dt.name}")
    problem = cast_problem(a, dt)
    if problem:
        raise InputError(f"input {spec.name!r} takes {dt.name} values; got {problem}")
    return a.astype(dt)


def cast_problem(a: np.ndarray, dt: np.dtype) -> str:
    """Why casting ``a`` to the integer or bool dtype ``dt`` would change its values ('' if it would not)."""
    if not a.size:
        return ""
    if a.dtype.kind == "f" and not np.array_equal(a, np.rint(a)):
        return "numbers that are not whole (or NaN)"
    if dt.kind == "b":
        return "" if np.isin(a, (0, 1)).all() else "numbers other than 0 and 1"
    info, lo, hi = np.iinfo(dt), a.min(), a.max()
    return f"{lo}..{hi}, outside {info.min}..{info.max}" if lo < info.min or hi > info.max else ""


class TFLiteModel(Model):
    def __init__(self, path: Path, threads: int, prefer: str | None):
        runtime, cls = tflite_interpreter_class(prefer)
        try:
            self._it = cls(model_path=str(path), num_threads=threads)
            self._it.allocate_tensors()
        except Exception as exc:  # runtimes raise ValueError/RuntimeError/SystemError
            raise ModelError(f"{path}: {runtime} could not load the model ({exc})") from exc
        sigs = self._it.get_signature_list()
        if sigs:
            runner = self._it.get_signature_runner(next(iter(sigs)))
            ins = list(runner.get_input_details().items())
            outs = list(runner.get_output_details().items())
        else:
            ins = [(d["name"], d) for d in self._it.get_input_details()]
            outs = [(d["name"], d) for d in self._it.get_output_details()]
        self._in_idx = [d["index"] for _, d in ins]
        self._out_idx = [d["index"] for _, d in outs]
        self._shapes = {d["index"]: tuple(int(s) for s in d["shape"]) for _, d in ins}
        self._errors = ""  # what LiteRT's error reporter said so far: it repeats every earlier message
        whole = all(len(d["shape_signature"]) and int(d["shape_signature"][0]) == -1 for _, d in ins)
        super().__init__(path, runtime, tuple(_tflite_spec(n, d) for n, d in ins),
                         tuple(_tflite_spec(n, d) for n, d in outs), whole_batch=whole)

    def ops(self) -> list[str]:
        return sorted({op["op_name"] for op in self._it._get_ops_details()} - {"DELEGATE"})

    def _call(self, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        it = self._it
        if any(self._shapes.get(i) != a.shape for i, a in zip(self._in_idx, arrays)):
            try:
                for idx, a in zip(self._in_idx, arrays):
                    it.resize_tensor_input(idx, a.shape, strict=False)
                it.allocate_tensors()
            except Exception as exc:  # the runtime cannot take these shapes: the caller's input
                self._shapes = {}
                raise InputError(f"{self.path.name}: the model does not take inputs of shapes "
                                 f"{[tuple(a.shape) for a in arrays]} ({exc})") from exc
            self._shapes = {i: a.shape for i, a in zip(self._in_idx, arrays)}
        for idx, spec, a in zip(self._in_idx, self.inputs, arrays):
            it.set_tensor(idx, quantize(a, spec))
        try:
            it.invoke()
        except Exception as exc:
            said = str(exc)
            new = said[len(self._errors):] if said.startswith(self._errors) else said
            self._errors = said
            new = new.strip()[:500] or type(exc).__name__
            if "out of bounds" in new or "out of range" in new:  # e.g. a token id beyond the vocabulary
                raise InputError(f"{self.path.name}: the model does not take this input ({new})") from exc
            raise ModelError(f"{self.path.name}: inference failed ({new})") from exc
        return {s.name: dequantize(it.get_tensor(i), s) for s, i in zip(self.outputs, self._out_idx)}

    def invoke(self) -> None:
        """Raw runtime call on whatever is in the input tensors (for benchmarks)."""
        self._it.invoke()

    def _set_raw(self, feed: list[np.ndarray]) -> None:
        for idx, spec, a in zip(self._in_idx, self.inputs, feed):
            self._it.set_tensor(idx, quantize(a, spec))


class ONNXModel(Model):
    def __init__(self, path: Path, threads: int, providers: Sequence[str] | None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeMissingError("ONNX Runtime is not installed; pip install onnxruntime") from exc
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        avail = ort.get_available_providers()
        chosen = [p for p in (providers or []) if p in avail] or ["CPUExecutionProvider"]
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=opts, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented
            raise ModelError(f"{path}: ONNX Runtime could not load the model ({exc})") from exc
        spec = lambda t: TensorSpec(t.name, ONNX_DTYPES.get(t.type, "float32"),  # noqa: E731
                                    tuple(s if isinstance(s, int) else -1 for s in t.shape))
        ins = self._sess.get_inputs()
        # One call takes a whole batch when every input's first dimension is symbolic and that symbol
        # appears nowhere else (a state [1, "batch", 64] must be fed sample by sample).
        lead = [t.shape[0] if len(t.shape) else 0 for t in ins]
        whole = all(not isinstance(d, int) for d in lead) and not any(
            d in lead for t in ins for d in t.shape[1:] if not isinstance(d, int))
        super().__init__(path, "onnxruntime", tuple(spec(t) for t in ins),
                         tuple(spec(t) for t in self._sess.get_outputs()), whole_batch=whole)
        self._feed: dict[str, np.ndarray] = {}

    def ops(self) -> list[str]:
        import onnx
        return sorted({n.op_type for n in onnx.load(str(self.path), load_external_data=False).graph.node})

    def _call(self, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        feed = {s.name: quantize(a, s) for s, a in zip(self.inputs, arrays)}
        try:
            res = self._sess.run(None, feed)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
            if type(exc).__name__ == "InvalidArgument":  # ONNX Runtime refused the input: the caller's mistake
                raise InputError(f"{self.path.name}: the model does not take this input ({first})") from exc
            raise ModelError(f"{self.path.name}: inference failed ({first})") from exc
        return {s.name: dequantize(np.asarray(r), s) for s, r in zip(self.outputs, res)}

    def invoke(self) -> None:
        self._sess.run(None, self._feed)

    def _set_raw(self, feed: list[np.ndarray]) -> None:
        self._feed = {s.name: quantize(a, s) for s, a in zip(self.inputs, feed)}


def load_model(path: str | Path, *, threads: int = 1, prefer: str | None = None,
               providers: Sequence[str] | None = None) -> Model:
    """Load a model file; the runtime family follows the file suffix."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    model: Model
    if path.suffix == ".tflite":
        model = TFLiteModel(path, threads, prefer)
    elif path.suffix == ".onnx":
        model = ONNXModel(path, threads, providers)
    else:
        raise ModelError(f"{path}: unknown model format (expected .tflite or .onnx)")
    model._load_args = {"threads": threads, "prefer": prefer, "providers": providers}
    return model


def _tflite_spec(name: str, d: dict[str, Any]) -> TensorSpec:
    scale, zp = d.get("quantization", (0.0, 0))
    sig = d.get("shape_signature")
    shape = tuple(int(s) for s in (sig if sig is not None and len(sig) else d["shape"]))
    return TensorSpec(name, np.dtype(d["dtype"]).name, shape,
                      float(scale) if scale else None, int(zp) if scale else None)
