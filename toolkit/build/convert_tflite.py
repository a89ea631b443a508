"""TensorFlow → TFLite variants: fp32, fp16, dynamic-range int8, full int8, int16x8, selective int8.

All variants come from the same source graph; quantized ones calibrate on the user's data.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Iterator

import numpy as np

from agent.layout import samples
from toolkit.errors import ConversionError
from toolkit.build.ingest import SourceModel
from toolkit.tfenv import import_tf, quiet_stderr

CALIBRATION_SAMPLES = 200


def converter_for(source: SourceModel, keras_model: Any = None) -> Any:
    tf = import_tf()
    if keras_model is not None or source.kind == "keras":
        return tf.lite.TFLiteConverter.from_keras_model(keras_model or source.handle)
    if source.kind == "savedmodel":
        return tf.lite.TFLiteConverter.from_saved_model(str(source.path))
    raise ConversionError(f"{source.path}: a {source.kind} model cannot be converted to TFLite here; "
                          f"give the Keras or SavedModel original, or target an onnxruntime profile")


def representative(source: SourceModel, calib: list[np.ndarray]):
    """One calibration sample per step, exactly as the model takes it (``agent.layout``); the converter
    quantizes float inputs only and leaves integer ones (token ids, a sample rate) alone."""
    feeds = samples([a[:CALIBRATION_SAMPLES] for a in calib], source.layout)
    by_name = source.kind != "keras" or len(source.inputs) > 1  # the converter orders several inputs its own way

    def gen() -> Iterator[Any]:
        for sample in feeds:
            yield {s.name: x for s, x in zip(source.inputs, sample)} if by_name else sample
    return gen


def configure(conv: Any, precision: str, source: SourceModel, calib: list[np.ndarray] | None,
              int8_io: str) -> Any:
    tf = import_tf()
    if precision == "fp32":
        return conv
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if precision == "fp16":
        conv.target_spec.supported_types = [tf.float16]
    elif precision == "dynamic-int8":
        pass
    elif precision in ("int8", "int16x8"):
        if calib is None:
            raise ConversionError(f"{precision} needs calibration data (--calibration data.npz)")
        conv.representative_dataset = representative(source, calib)
        if precision == "int8":
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            io_type = {"int8": tf.int8, "uint8": tf.uint8, "float": tf.float32}[int8_io]
            conv.inference_input_type = conv.inference_output_type = io_type
        else:
            conv.target_spec.supported_ops = [
                tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    else:
        raise ConversionError(f"unknown TFLite precision {precision!r}")
    return conv


def convert(source: SourceModel, precision: str, calib: list[np.ndarray] | None,
            int8_io: str = "int8", keras_model: Any = None) -> bytes:
    """One TFLite variant as bytes. Converter failures become ConversionError with the op names."""
    conv = configure(converter_for(source, keras_model), precision, source, calib, int8_io)
    return run_converter(lambda: conv.convert(), f"{source.path.name} → tflite {precision}")


def run_converter(fn: Any, what: str) -> Any:
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), quiet_stderr():
            return fn()
    except Exception as exc:  # the converter raises ConverterError / ValueError / RuntimeError
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        ops = [ln for ln in lines if "op" in ln.lower() and ("not supported" in ln or "tfl." in ln
                                                             or "tf." in ln)]
        detail = "; ".join((ops or lines)[:6])
        raise ConversionError(f"{what} failed: {detail}") from exc
