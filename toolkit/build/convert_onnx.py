"""ONNX variants: fp32 (tf2onnx for TensorFlow sources), fp16, dynamic int8 and static QDQ int8.

Quantization never silently yields a float model: Constant-node weights are first turned into
initializers (ONNX Runtime's quantizer only sees initializers), and the result is checked for
quantized ops; a model with none is refused with a ConversionError. Only float tensors are quantized
(integer inputs such as token ids pass through). Older exports are brought up to the opset that
per-channel QDQ needs (13) when the profile allows it; where per-channel quantization is impossible
the variant is quantized per tensor, and the notes say so.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from agent.layout import samples
from toolkit.build.convert_tflite import CALIBRATION_SAMPLES, run_converter
from toolkit.errors import ConversionError
from toolkit.build.ingest import SourceModel
from toolkit.tfenv import import_tf

TF2ONNX_OPSET = 17  # the highest opset tf2onnx 1.17 exports well (docs: dependencies)
PER_CHANNEL_OPSET = 13  # DequantizeLinear gained its `axis` attribute in opset 13
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
             "ConvInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "QGemm"}


def export_opset(source: SourceModel, max_opset: int) -> int:
    """The opset the fp32 ONNX graph will have for a profile allowing ``max_opset``."""
    if source.kind == "onnx":
        import onnx

        return min(opset_of(onnx.load(str(source.path), load_external_data=False)), max_opset)
    return min(max_opset, TF2ONNX_OPSET)


def to_onnx(source: SourceModel, opset: int, keras_model: Any = None) -> Any:
    """The fp32 ONNX graph of the source model, at ``opset`` or lower."""
    import onnx

    if source.kind == "onnx":
        model = onnx.load(str(source.path))
        drop_initializer_inputs(model)
        current = opset_of(model)
        if current > opset:
            model = convert_opset(model, opset, f"{source.path}: opset {current} exceeds the profile's "
                                                f"max opset {opset} and cannot be converted down")
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
    model, _ = run_converter(fn, f"{source.path.name} → onnx (opset {min(opset, TF2ONNX_OPSET)})")
    return model


def drop_initializer_inputs(model: Any) -> int:
    """Old exporters (IR < 4) also listed every weight as a graph input, so that it could be fed; no
    runtime needs that, and it hides the weights from quantizers and the fp16 converter. Removes
    them from ``graph.input`` in place; returns how many."""
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    keep = [i for i in graph.input if i.name not in weights]
    dropped = len(graph.input) - len(keep)
    if dropped:
        del graph.input[:]
        graph.input.extend(keep)
        model.ir_version = max(model.ir_version, 4)
    return dropped


def convert_opset(model: Any, opset: int, what: str) -> Any:
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:  # the converter raises plain RuntimeError/ValueError per missing adapter
        raise ConversionError(f"{what} ({' '.join(str(exc).split())})") from exc


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


FP16_MAX = 65504.0


def to_fp16(model: Any) -> Any:
    """fp16 weights and activations, I/O kept float32. Nodes that read a constant beyond fp16's range
    (a BatchNorm variance of 1e8, say) stay in float32: clipped to 65504 they would break the model."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.ModelProto.FromString(model.SerializeToString())
    keep = fp32_nodes(model)
    return run_converter(lambda: convert_float_to_float16(model, keep_io_types=True, node_block_list=keep or None),
                         "onnx fp16")


def fp32_nodes(model: Any) -> list[str]:
    """Names of the nodes that read a float tensor constant outside fp16's range (unnamed nodes get a name)."""
    from onnx import numpy_helper

    big = {i.name for i in model.graph.initializer if _beyond_fp16(numpy_helper.to_array(i))}
    big |= {n.output[0] for n in model.graph.node if n.op_type == "Constant" and len(n.attribute) == 1
            and n.attribute[0].name == "value" and _beyond_fp16(numpy_helper.to_array(n.attribute[0].t))}
    keep = []
    for k, node in enumerate(model.graph.node):
        if big & set(node.input):
            node.name = node.name or f"edgeship_fp32_{k}"
            keep.append(node.name)
    return keep


def _beyond_fp16(a: Any) -> bool:
    return a.dtype.kind == "f" and a.size > 0 and bool(np.nanmax(np.abs(np.where(np.isfinite(a), a, 0))) > FP16_MAX)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ONNX Runtime's quantizer warns through the root logger ("Please consider to run pre-processing"):
    advice for its own users, noise in edgeship's output (the note on the variant says what matters)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def quantize(model: Any, precision: str, calib: list[np.ndarray] | None, input_names: list[str],
             layout: str, max_opset: int) -> tuple[Any, list[str]]:
    """dynamic-int8 or static QDQ int8 (per-channel where possible), refusing a model that ends up
    unquantized. Returns the model and notes on what had to change (opset, per-tensor fallback)."""
    import onnx

    notes: list[str] = []
    model = onnx.ModelProto.FromString(model.SerializeToString())
    moved = constants_to_initializers(model)
    current = opset_of(model)
    per_channel = precision == "int8"
    if current < PER_CHANNEL_OPSET:
        if max_opset >= PER_CHANNEL_OPSET:
            model = convert_opset(model, PER_CHANNEL_OPSET, f"opset {current} → {PER_CHANNEL_OPSET} "
                                                            f"for quantization")
            notes.append(f"opset upgraded {current} → {PER_CHANNEL_OPSET} for quantization")
        elif current < 10:
            raise ConversionError(f"ONNX quantization needs opset >= 10; the model has {current} and the "
                                  f"profile allows at most {max_opset}")
        else:
            per_channel = False
            notes.append(f"quantized per tensor: per-channel needs opset {PER_CHANNEL_OPSET}, the profile "
                         f"allows {max_opset}")
    if precision == "int8" and calib is None:
        raise ConversionError("int8 needs calibration data (--calibration data.npz)")
    if precision not in ("int8", "dynamic-int8"):
        raise ConversionError(f"unknown ONNX quantization {precision!r}")
    with _quiet_root_logger():
        try:
            result = _quantize(model, precision, calib, input_names, layout, per_channel)
        except ConversionError as exc:
            if not per_channel:
                raise
            result = _quantize(model, precision, calib, input_names, layout, False)
            notes.append(f"quantized per tensor: per-channel quantization failed ({exc})")
    if quant_op_count(result) == 0:
        ops = sorted({n.op_type for n in result.graph.node})
        raise ConversionError(f"ONNX Runtime could not quantize any op for {precision} (ops: "
                              f"{', '.join(ops)}; {moved} Constant weights were moved to "
                              f"initializers); refusing to output an unquantized 'int8' model")
    return result, notes


def _quantize(model: Any, precision: str, calib: list[np.ndarray] | None, input_names: list[str],
              layout: str, per_channel: bool) -> Any:
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="edgeship-onnxq-") as tmp:
        src, pre, out = Path(tmp, "src.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "q.onnx")
        onnx.save(model, str(src))
        if precision == "dynamic-int8":
            run_converter(lambda: quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8,
                                                   per_channel=per_channel), "onnx dynamic int8")
        else:
            assert calib is not None
            feeds = samples([a[:CALIBRATION_SAMPLES] for a in calib], layout)

            class Reader(CalibrationDataReader):
                """One sample per call, exactly as the model takes it; integer inputs as they are."""

                def __init__(self) -> None:
                    self._it = iter([dict(zip(input_names, f)) for f in feeds])

                def get_next(self) -> dict[str, np.ndarray] | None:
                    return next(self._it, None)

            run_converter(lambda: quant_pre_process(str(src), str(pre), skip_symbolic_shape=True),
                          "onnx quantization pre-processing")
            run_converter(lambda: quantize_static(
                str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8), "onnx static int8")
        return onnx.load(str(out))


def opset_of(model: Any) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def serialize(model: Any) -> bytes:
    return model.SerializeToString()


