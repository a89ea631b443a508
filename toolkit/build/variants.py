"""Produce the model files a profile asks for, with a cache shared across profiles of one build."""

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

    def candidates(self, profile: Profile) -> list[Candidate]:
        if self.source.kind == "tflite":
            if profile.format != "tflite":
                raise ConversionError(f"{self.source.path}: a .tflite model can only be bundled for "
                                      f"TFLite profiles, not {profile.name} ({profile.runtime})")
            return [Candidate("as-is", self.source.path.read_bytes(),
                              notes=["existing .tflite bundled as-is after a load check; "
                                     "re-quantization is not possible from a .tflite file"])]
        out = [self.get(profile, p) for p in profile.precisions]
        if self.qat_model is not None and "int8" in profile.precisions:
            out.append(self.get(profile, "int8-qat"))
        return out

    def get(self, profile: Profile, precision: str) -> Candidate:
        key = (profile.format, precision, profile.int8_io if profile.format == "tflite" else "",
               profile.max_opset)
        if key not in self._cache:
            try:
                data = (self._tflite(precision, profile.int8_io) if profile.format == "tflite"
                        else self._onnx(precision, profile.max_opset or 17))
                self._cache[key] = Candidate(precision, data)
            except ConversionError as exc:
                self._cache[key] = Candidate(precision, None, error=str(exc))
        c = self._cache[key]
        return Candidate(c.precision, c.data, c.error, list(c.notes))

    def _tflite(self, precision: str, int8_io: str) -> bytes:
        if precision == "int8-qat":
            return convert_tflite.convert(self.source, "int8", self.calib, int8_io, self.qat_model)
        return convert_tflite.convert(self.source, precision, self.calib, int8_io, self.keras_model)

    def _onnx(self, precision: str, opset: int) -> bytes:
        if precision == "int8-qat":
            raise ConversionError("QAT variants are produced for TFLite profiles only")
        if opset not in self._onnx_fp32:
            self._onnx_fp32[opset] = convert_onnx.to_onnx(self.source, opset, self.keras_model)
        base = self._onnx_fp32[opset]
        if precision == "fp32":
            model = base
        elif precision == "fp16":
            model = convert_onnx.to_fp16(base)
        else:
            model = convert_onnx.quantize(base, precision, self.calib,
                                          [s.name for s in self.source.inputs])
        got = convert_onnx.opset_of(model)
        if got > opset:
            raise ConversionError(f"onnx {precision} uses opset {got} > the profile's max {opset}")
        return convert_onnx.serialize(model)
