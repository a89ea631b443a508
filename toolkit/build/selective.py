"""Repair a full-int8 model that fails the accuracy gate by keeping its worst layers in float.

TensorFlow's QuantizationDebugger compares every quantized op's output with its float twin on the
calibration data. Ops are ranked by their error relative to their typical values; the top k are
denylisted (kept in float) for k = 1, 2, 4, ... until the candidate passes the caller's check.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from toolkit.build.convert_tflite import configure, converter_for, representative, run_converter
from toolkit.errors import ConversionError
from toolkit.build.ingest import SourceModel
from toolkit.tfenv import import_tf


@dataclass
class LayerError:
    op: str
    tensor: str
    nrmse: float


def debug_dataset(source: SourceModel, calib: list[np.ndarray], keras_model: Any = None):
    """The QuantizationDebugger feeds each sample as a list in the converted model's input order (it
    cannot take the signature-keyed dicts the converter takes); with several inputs that order is read from
    a float conversion (the converter orders them its own way)."""
    feeds = representative(source, calib)
    if len(source.inputs) == 1:
        return lambda: (list(f.values()) if isinstance(f, dict) else f for f in feeds())
    tf = import_tf()
    flat = run_converter(lambda: converter_for(source, keras_model).convert(), "float conversion")
    names = [d["name"] for d in tf.lite.Interpreter(model_content=flat).get_input_details()]
    order = [next((s.name for s in source.inputs if n in (s.name, f"serving_default_{s.name}:0")), None)
             for n in names]
    if None in order:
        raise ConversionError(f"selective quantization: cannot match the converted inputs {names} to the "
                              f"model's {[s.name for s in source.inputs]}")
    return lambda: ([f[k] for k in order] for f in feeds())


def rank_layers(source: SourceModel, calib: list[np.ndarray], keras_model: Any = None) -> list[LayerError]:
    tf = import_tf()
    conv = configure(converter_for(source, keras_model), "int8", source, calib, "float")
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    opts = tf.lite.experimental.QuantizationDebugOptions(
        layer_direct_compare_metrics={"robust_nrmse": robust_nrmse})
    dbg = run_converter(lambda: tf.lite.experimental.QuantizationDebugger(
        converter=conv, debug_dataset=debug_dataset(source, calib, keras_model), debug_options=opts),
        "quantization debugger")
    run_converter(dbg.run, "quantization debugger run")
    buf = io.StringIO()
    dbg.layer_statistics_dump(buf)
    rows = [LayerError(r["op_name"], r["tensor_name"], float(r["robust_nrmse"]))
            for r in csv.DictReader(io.StringIO(buf.getvalue()))]
    return sorted(rows, key=lambda e: -e.nrmse)


def robust_nrmse(float_tensors: list[np.ndarray], quant_tensors: list[np.ndarray], scale: float,
                 zero_point: int) -> float:
    """Quantization RMSE relative to the RMS of the tensor's typical values (|x| <= p99).

    Plain RMSE/scale cannot see a layer whose range is blown up by a few outliers (its error is
    still under one step, but the step is larger than most values); excluding the outliers from the
    reference magnitude exposes it.
    """
    with np.errstate(all="ignore"):  # a NaN/Inf float activation ranks the layer worst, quietly
        f = np.concatenate([np.asarray(t, np.float64).ravel() for t in float_tensors])
        q = np.concatenate([np.asarray(t, np.float64).ravel() for t in quant_tensors])
        if not (np.isfinite(f).all() and np.isfinite(q).all()):
            return float("inf")
        deq = (q - zero_point) * scale
        err = float(np.sqrt(np.mean((deq - f) ** 2)))
        mag = np.abs(f)
        typical = f[mag <= np.quantile(mag, 0.99)] if f.size else f
        ref = float(np.sqrt(np.mean(typical ** 2))) if typical.size else 0.0
    return err / max(ref, 1e-12)


def build_selective(source: SourceModel, calib: list[np.ndarray], denylist: list[str],
                    keras_model: Any = None) -> bytes:
    tf = import_tf()
    conv = configure(converter_for(source, keras_model), "int8", source, calib, "float")
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    opts = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=denylist)
    dbg = run_converter(lambda: tf.lite.experimental.QuantizationDebugger(
        converter=conv, debug_dataset=debug_dataset(source, calib, keras_model), debug_options=opts),
        "selective quantization")
    return run_converter(dbg.get_nondebug_quantized_model, "selective quantization")


def repair(source: SourceModel, calib: list[np.ndarray], accept: Callable[[bytes], bool],
           max_fraction: float = 0.5, keras_model: Any = None) -> tuple[bytes, list[LayerError]] | None:
    """Smallest top-k float set that ``accept``s; None when even max_fraction of ops is not enough."""
    if not source.is_tf:
        raise ConversionError("selective quantization needs a Keras or SavedModel source")
    ranked = [e for e in rank_layers(source, calib, keras_model) if e.nrmse > 0]
    limit = max(1, int(len(ranked) * max_fraction))
    k = 1
    while k <= limit:
        chosen = ranked[:k]
        model = build_selective(source, calib, [e.tensor for e in chosen], keras_model)
        if accept(model):
            return model, chosen
        k *= 2
    return None
