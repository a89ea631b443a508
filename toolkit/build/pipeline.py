"""`edgeship build`: source model → per-profile variants → validation gate → signed bundle.

Per profile: produce every accepted precision, run each in the profile's runtime family against the
fp32 reference, measure latency/RSS in an isolated process, gate on accuracy and budgets, repair a
failing full-int8 with selective quantization, pick the best passing variant by the profile's
objective, and write a signed bundle. Nothing is written for a profile with no passing variant.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from agent.manifest import FORMATS
from agent.store import atomic_write
from toolkit.build import edgetpu, selective
from toolkit.build.data import Dataset, load_dataset
from toolkit.errors import BuildFailed, ConversionError, InputError
from toolkit.build.gate import VariantResult, accuracy_only_failure, choose, evaluate, table
from toolkit.build.ingest import load_source
from toolkit.build.measure import LatencyConfig
from toolkit.build.package import input_stats, npz_bytes, write
from toolkit.profiles import Profile
from toolkit.registry import Registry
from toolkit.signing import SigningKey
from toolkit.build.variants import VariantFactory

Progress = Callable[[str], None]


@dataclass
class BuildOptions:
    model: Path
    profiles: list[Profile]
    validation: Path
    out_dir: Path
    key: SigningKey
    calibration: Path | None = None
    train: Path | None = None
    name: str | None = None
    version: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    registry: Registry | None = None
    prune: float | None = None
    qat: bool = False
    epochs: int = 2
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    runtime_pythons: dict[str, str] = field(default_factory=dict)  # "tflite-runtime-2.14.0" -> python
    golden_count: int = 8
    selective: bool = True
    variant: str | None = None  # pin the chosen precision (must pass the gate)
    keep_variants: Path | None = None  # keep every variant file in this folder
    source_origin: dict[str, Any] = field(default_factory=dict)  # where the model came from (MLflow URI…)


@dataclass
class ProfileResult:
    profile: Profile
    variants: list[VariantResult]
    chosen: VariantResult | None = None
    bundle: Path | None = None
    bundle_sha256: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile.name, "runtime": f"{self.profile.runtime} "
                f"{self.profile.runtime_version}", "objective": self.profile.objective,
                "chosen": self.chosen.precision if self.chosen else None,
                "bundle": str(self.bundle) if self.bundle else None, "bundle_sha256": self.bundle_sha256,
                "notes": self.notes, "variants": [v.row() for v in self.variants]}


@dataclass
class BuildResult:
    name: str
    version: int
    profiles: list[ProfileResult]
    notes: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)  # as signed into every bundle's manifest

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "notes": self.notes,
                "provenance": self.provenance, "profiles": [p.to_dict() for p in self.profiles]}

    def table(self) -> str:
        return table([v for p in self.profiles for v in p.variants])


def build(opts: BuildOptions, progress: Progress = lambda _msg: None) -> BuildResult:
    progress("loading model")
    source = load_source(opts.model)
    name = opts.name or opts.model.stem.split(".")[0]
    for profile in opts.profiles:
        check_supported(source, profile)
    val = load_dataset(opts.validation, source.inputs, "validation")
    notes: list[str] = []
    if opts.calibration:
        calib: Dataset = load_dataset(opts.calibration, source.inputs, "calibration")
    else:
        calib = val
        notes.append("no --calibration given: calibrating int8 variants on the validation data")
    train = load_dataset(opts.train, source.inputs, "training") if opts.train else None
    version = opts.version or (opts.registry.next_version(name) if opts.registry else 1)
    if version < 1:
        raise InputError(f"--version {version}: versions start at 1")
    progress("computing fp32 reference outputs")
    reference = source.predict(val.inputs)
    keras_model = qat_model = None
    if opts.prune:
        from toolkit.build import finetune

        progress(f"pruning to {opts.prune:.0%} sparsity")
        keras_model, sparsity = finetune.prune(source, train, opts.prune, opts.epochs)
        notes.append(f"pruned with tfmot: {sparsity:.1%} of kernel weights are zero")
    if opts.qat:
        from toolkit.build import finetune

        progress("quantization-aware training")
        qat_model = finetune.qat(source, train, opts.epochs, base=keras_model)
    factory = VariantFactory(source, calib.inputs, keras_model, qat_model)
    stats = input_stats([s.name for s in source.inputs], calib.inputs)
    provenance = {"source": {"file": opts.model.name, "kind": source.kind, "sha256": source.sha256,
                             **({"origin": opts.source_origin} if opts.source_origin else {})},
                  "calibration_sha256": calib.sha256, "validation_sha256": val.sha256,
                  **({"training_sha256": train.sha256} if train else {}),
                  "fine_tuning": {"prune": opts.prune, "qat": opts.qat,
                                  "epochs": opts.epochs if (opts.prune or opts.qat) else 0}}
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="edgeship-build-") as tmp:
        work = Path(tmp)
        if opts.keep_variants:
            work = opts.keep_variants
            work.mkdir(parents=True, exist_ok=True)
        bench_inputs = work / "bench_inputs.npz"
        bench_inputs.write_bytes(npz_bytes({s.name: a[:1] for s, a in zip(source.inputs, val.inputs)}))
        eval_inputs = work / "eval_inputs.npz"
        eval_inputs.write_bytes(npz_bytes({s.name: a for s, a in zip(source.inputs, val.inputs)}))
        for profile in opts.profiles:
            ctx = _Ctx(opts, profile, source, calib, val, reference, work, bench_inputs, eval_inputs,
                       progress, keras_model)
            pr = ctx.run(factory)
            if pr.chosen is not None:
                progress(f"[{profile.name}] signing bundle ({pr.chosen.precision})")
                out = opts.out_dir / f"{name}-v{version}-{profile.name}.bundle"
                model_bytes, extra = edgetpu.maybe_compile(pr.chosen, profile, work)
                pr.notes += extra
                write(out, name=name, version=version, profile=profile, variant=pr.chosen, key=opts.key,
                      val_inputs=val.inputs, stats=stats, meta=opts.meta, provenance=provenance,
                      golden_count=opts.golden_count, model_bytes=model_bytes)
                pr.bundle = out
                pr.bundle_sha256 = hashlib.sha256(out.read_bytes()).hexdigest()
                if opts.registry:
                    opts.registry.record(model=name, version=version, profile=profile.name,
                                         variant=pr.chosen.precision, fmt=profile.format,
                                         size_bytes=pr.chosen.size_bytes, bundle_path=str(out.resolve()),
                                         bundle_sha256=pr.bundle_sha256, metrics=pr.to_dict())
            results.append(pr)
    result = BuildResult(name, version, results, notes, provenance)
    failed = [p.profile.name for p in results if p.chosen is None]
    if failed:
        raise BuildFailed(result, f"no variant passed the validation gate for: {', '.join(failed)}")
    return result


def check_supported(source: Any, profile: Profile) -> None:
    """Refuse source/profile pairs edgeship cannot convert, before any work is done."""
    if source.kind == "onnx" and profile.format == "tflite":
        raise ConversionError(f"{source.path}: an ONNX model cannot be converted to TFLite for "
                              f"{profile.name}; give the Keras or SavedModel original, or target an "
                              f"onnxruntime profile")
    if source.kind == "tflite" and profile.format != "tflite":
        raise ConversionError(f"{source.path}: a .tflite model can only be bundled for TFLite profiles, "
                              f"not {profile.name} ({profile.runtime})")


@dataclass
class _Ctx:
    opts: BuildOptions
    profile: Profile
    source: Any
    calib: Dataset
    val: Dataset
    reference: list[np.ndarray]
    work: Path
    bench_inputs: Path
    eval_inputs: Path
    progress: Progress
    keras_model: Any

    @property
    def runtime_python(self) -> str | None:
        p = self.profile
        return self.opts.runtime_pythons.get(f"{p.runtime}-{p.runtime_version}")

    def run(self, factory: VariantFactory) -> ProfileResult:
        p = self.profile
        pr = ProfileResult(p, [])
        if p.runtime == "tflite-runtime" and not self.runtime_python:
            pr.notes.append(f"{p.runtime} {p.runtime_version} is not installed on this host: variants "
                            f"were checked in LiteRT only (run `edgeship runtimes install {p.name}`)")
        self.progress(f"[{p.name}] converting")
        for cand in factory.candidates(p):
            v = VariantResult(p.name, cand.precision, None, notes=list(cand.notes))
            pr.variants.append(v)
            if cand.data is None:
                v.reasons.append(cand.error)
                continue
            v.file = self.work / f"{p.name}-{cand.precision}{FORMATS[p.format]}"
            v.file.write_bytes(cand.data)
            self.progress(f"[{p.name}] measuring {cand.precision}")
            self._evaluate(v)
        int8 = next((v for v in pr.variants if v.precision == "int8"), None)
        if int8 is not None and accuracy_only_failure(int8) and self.opts.selective:
            if p.edgetpu:
                pr.notes.append("full int8 failed accuracy; selective quantization is not possible "
                                "on the Edge TPU (it runs integer ops only)")
            elif self.source.is_tf:
                self.progress(f"[{p.name}] repairing int8 with selective quantization")
                pr.variants.append(self._repair(int8))
        pinned = self.opts.variant
        if pinned and not any(v.precision == pinned for v in pr.variants):
            pr.notes.append(f"--variant {pinned}: not produced for this profile "
                            f"(accepted: {', '.join(p.precisions)})")
        pool = [v for v in pr.variants if v.precision == pinned] if pinned else pr.variants
        pr.chosen = choose(pool, p)
        return pr

    def _evaluate(self, v: VariantResult) -> VariantResult:
        return evaluate(v, self.profile, self.eval_inputs, self.reference, self.val.labels,
                        [s.name for s in self.source.outputs], self.bench_inputs, self.opts.latency,
                        self.runtime_python)

    def _repair(self, int8: VariantResult) -> VariantResult:
        p = self.profile
        v = VariantResult(p.name, "int8-selective", self.work / f"{p.name}-int8-selective.tflite")
        if p.format != "tflite":
            v.reasons.append("selective quantization is implemented for TFLite profiles")
            return v

        trials: list[VariantResult] = []

        def accept(model: bytes) -> bool:
            assert v.file is not None
            v.file.write_bytes(model)
            trials.append(self._evaluate(VariantResult(p.name, v.precision, v.file)))
            return trials[-1].passed

        found = selective.repair(self.source, self.calib.inputs, accept, keras_model=self.keras_model)
        if found is None:
            v.reasons.append("selective quantization could not recover accuracy with up to half the "
                             "ops in float")
            return v
        v = trials[-1]  # the accepted candidate, already measured; its file is the last one written
        v.float_layers = [e.tensor for e in found[1]]
        base = int8.size_bytes or 1
        v.notes.append(f"kept {len(v.float_layers)} op(s) in float: {', '.join(v.float_layers)}; size "
                       f"{v.size_bytes / base:.2f}x of plain int8; float I/O")
        return v


def write_summary(result: BuildResult, path: Path) -> None:
    atomic_write(path, json.dumps(result.to_dict(), indent=2, sort_keys=True, default=str).encode())


