"""Produce the model files a profile's runtime asks for, with a cache shared across the profiles of
one build (profiles that want the same file get the same bytes, converted once)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from toolkit.build import convert_onnx, convert_tflite
from toolkit.errors import ConversionError
from toolkit.build.ingest import SourceModel
from toolkit.profiles import Profile


@dataclass
class Candidate:
    """A variant's bytes before measurement."""

    precision: str
    data: bytes | None
    error: str = ""
    notes: list[str] = field(default_factory=list)


class VariantFactory:
    def __init__(self, source: SourceModel, calib: list[np.ndarray] | None,
                 keras_model: Any = None, qat_model: Any = None):
        self.source, self.calib = source, calib
        self.keras_model, self.qat_model = keras_model, qat_model
        self._cache: dict[tuple, Candidate] = {}
        self._onnx_fp32: dict[int, Any] = {}
        self._export_opsets: dict[int, int] = {}

    def candidates(self, profile: Profile) -> list[Candidate]:
        """The variants of ``profile``'s (first) runtime; the pipeline passes one-runtime views."""
        if self.source.kind == "tflite":
            if profile.format != "tflite":
                raise ConversionError(f"{self.source.path}: a .tflite model can only be bundled for "
                                      f"TFLite runtimes, not {profile.runtime}")
            if profile.edgetpu:
                return [self._for_edgetpu(profile)]
            return [Candidate("as-is", self.source.path.read_bytes(),
                              notes=["existing .tflite bundled as-is after a load check; "
                                     "re-quantization is not possible from a .tflite file"])]
        out = [self.get(profile, p) for p in profile.precisions]
        if self.qat_model is not None and "int8" in profile.precisions:
            out.append(self.get(profile, "int8-qat"))
        return out

    def _for_edgetpu(self, profile: Profile) -> Candidate:
        from agent.runtime import load_model

        model = load_model(self.source.path)
        io = {s.dtype for s in model.inputs + model.outputs}
        if io != {profile.int8_io} or not all(s.quantized for s in model.inputs + model.outputs):
            return Candidate("as-is", None, error=f"the Edge TPU needs a full-int8 model with {profile.int8_io} "
                                                  f"I/O; this .tflite has {', '.join(sorted(io))} I/O and "
                                                  f"cannot be re-quantized")
        return Candidate("as-is", self.source.path.read_bytes(), notes=["existing .tflite bundled as-is"])

    def get(self, profile: Profile, precision: str) -> Candidate:
        if profile.format == "tflite":
            key: tuple = ("tflite", precision, profile.int8_io)
        else:
            max_opset = profile.max_opset or 17
            # quantization only cares whether the profile allows the per-channel opset
            key = ("onnx", precision, self._export(max_opset), min(max_opset, convert_onnx.PER_CHANNEL_OPSET)
                   if precision in ("int8", "dynamic-int8") else None)
        if key not in self._cache:
            try:
                notes: list[str] = []
                data = (self._tflite(precision, profile.int8_io) if profile.format == "tflite"
                        else self._onnx(precision, profile.max_opset or 17, notes))
                self._cache[key] = Candidate(precision, data, notes=notes)
            except ConversionError as exc:
                self._cache[key] = Candidate(precision, None, error=str(exc))
        c = self._cache[key]
        return Candidate(c.precision, c.data, c.error, list(c.notes))

    def _export(self, max_opset: int) -> int:
        if max_opset not in self._export_opsets:
            self._export_opsets[max_opset] = convert_onnx.export_opset(self.source, max_opset)
        return self._export_opsets[max_opset]

    def _tflite(self, precision: str, int8_io: str) -> bytes:
        if precision == "int8-qat":
            return convert_tflite.convert(self.source, "int8", self.calib, int8_io, self.qat_model)
        return convert_tflite.convert(self.source, precision, self.calib, int8_io, self.keras_model)

    def _onnx(self, precision: str, opset: int, notes: list[str]) -> bytes:
        if precision == "int8-qat":
            raise ConversionError("QAT variants are produced for TFLite profiles only")
        export = self._export(opset)
        if export not in self._onnx_fp32:
            self._onnx_fp32[export] = convert_onnx.to_onnx(self.source, export, self.keras_model)
        base = self._onnx_fp32[export]
        if precision == "fp32":
            model = base
        elif precision == "fp16":
            model = convert_onnx.to_fp16(base)
        else:
            model, extra = convert_onnx.quantize(base, precision, self.calib,
                                                 [s.name for s in self.source.inputs], self.source.layout, opset)
            notes += extra
        got = convert_onnx.opset_of(model)
        if got > opset:
            raise ConversionError(f"onnx {precision} uses opset {got} > the profile's max {opset}")
        return convert_onnx.serialize(model)
