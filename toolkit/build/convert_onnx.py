"""ONNX variants: fp32 (tf2onnx for TensorFlow sources), fp16, dynamic int8 and static QDQ int8.

Quantization never silently yields a float model: Constant-node weights are first turned into
initializers (ONNX Runtime's quantizer only sees initializers), and the result is checked for
quantized ops; a model with none is refused with a ConversionError.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.build.convert_tflite import run_converter
from toolkit.errors import ConversionError
from toolkit.build.ingest import SourceModel
from toolkit.tfenv import import_tf

QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
             "ConvInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "QGemm"}


def to_onnx(source: SourceModel, opset: int, keras_model: Any = None) -> Any:
    """The fp32 ONNX graph of the source model, at ``opset`` or lower."""
    import onnx

    if source.kind == "onnx":
        model = onnx.load(str(source.path))
        current = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
        if current > opset:
            from onnx import version_converter

            try:
                model = version_converter.convert_version(model, opset)
            except Exception as exc:
                raise ConversionError(f"{source.path}: opset {current} exceeds the profile's max "
                                      f"opset {opset} and cannot be converted down ({exc})") from exc
        return model
    if not source.is_tf:
        raise ConversionError(f"{source.path}: a {source.kind} model cannot be converted to ONNX here")
    tf = import_tf()
    import tf2onnx

    spec = [tf.TensorSpec([None if d == -1 else d for d in s.shape], s.dtype, name=s.name)
            for s in source.inputs]
    if keras_model is not None or source.kind == "keras":
        fn = lambda: tf2onnx.convert.from_keras(keras_model or source.handle,  # noqa: E731
                                                input_signature=spec, opset=opset)
    else:
        def fn() -> Any:
            from tf2onnx import tf_loader

            graph_def, ins, outs, _, renames = tf_loader.from_saved_model(
                str(source.path), None, None, "serve", ["serving_default"], None, False,
                return_initialized_tables=True, return_tensors_to_rename=True)
            return tf2onnx.convert.from_graph_def(graph_def, input_names=ins, output_names=outs,
                                                  opset=opset, tensors_to_rename=renames)
    tf2onnx.utils.INTERNAL_NAME = 1  # tf2onnx numbers generated names globally: reset for reproducibility
    model, _ = run_converter(fn, f"{source.path.name} → onnx (opset {opset})")
    return model


def constants_to_initializers(model: Any) -> int:
    """Move tensor-valued Constant nodes into graph initializers, in place; returns how many moved."""
    from onnx import numpy_helper

    graph, moved = model.graph, 0
    for node in list(graph.node):
        if node.op_type != "Constant" or len(node.attribute) != 1 or node.attribute[0].name != "value":
            continue
        tensor = numpy_helper.from_array(numpy_helper.to_array(node.attribute[0].t), node.output[0])
        graph.initializer.append(tensor)
        graph.node.remove(node)
        moved += 1
    return moved


def quant_op_count(model: Any) -> int:
    return sum(1 for n in model.graph.node if n.op_type in QUANT_OPS)


def to_fp16(model: Any) -> Any:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return run_converter(lambda: convert_float_to_float16(model, keep_io_types=True), "onnx fp16")


def quantize(model: Any, precision: str, calib: list[np.ndarray] | None, input_names: list[str]) -> Any:
    """dynamic-int8 or static QDQ int8 (per-channel), refusing a model that ends up unquantized."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.ModelProto.FromString(model.SerializeToString())
    moved = constants_to_initializers(model)
    with tempfile.TemporaryDirectory(prefix="edgeship-onnxq-") as tmp:
        src, pre, out = Path(tmp, "src.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "q.onnx")
        onnx.save(model, str(src))
        if precision == "dynamic-int8":
            run_converter(lambda: quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8),
                          "onnx dynamic int8")
        elif precision == "int8":
            if calib is None:
                raise ConversionError("int8 needs calibration data (--calibration data.npz)")

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    n = min(200, calib[0].shape[0])
                    self._it = iter([{name: a[i:i + 1] for name, a in zip(input_names, calib)}
                                     for i in range(n)])

                def get_next(self) -> dict[str, np.ndarray] | None:
                    return next(self._it, None)

            run_converter(lambda: quant_pre_process(str(src), str(pre), skip_symbolic_shape=True),
                          "onnx quantization pre-processing")
            run_converter(lambda: quantize_static(
                str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8), "onnx static int8")
        else:
            raise ConversionError(f"unknown ONNX quantization {precision!r}")
        result = onnx.load(str(out))
    if quant_op_count(result) == 0:
        ops = sorted({n.op_type for n in result.graph.node})
        raise ConversionError(f"ONNX Runtime could not quantize any op for {precision} (ops: "
                              f"{', '.join(ops)}; {moved} Constant weights were moved to "
                              f"initializers); refusing to output an unquantized 'int8' model")
    return result


def opset_of(model: Any) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def serialize(model: Any) -> bytes:
    return model.SerializeToString()


