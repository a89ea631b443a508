"""`edgeship build`: source model → per-profile variants → validation gate → signed bundle.

Per profile and per runtime the profile offers that the source can go to: produce every accepted
precision, run each in that runtime against the fp32 reference, measure latency/RSS in an isolated
process, gate on accuracy and budgets, repair a failing full-int8 with selective quantization; then
pick the best passing variant over all of the profile's runtimes by its objective, and write a signed
bundle for that runtime. Every profile gets its own verdict: a profile that cannot take the source, or
where nothing passes, gets no bundle and a reason, and the others still get theirs.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from agent.manifest import FORMATS, no_wheels, valid_name
from agent.store import atomic_write
from toolkit.build import edgetpu, selective
from toolkit.build import state as state_mod
from toolkit.build.data import Dataset, check_labels, load_dataset
from toolkit.errors import BuildFailed, ConversionError, InputError
from toolkit.build.gate import VariantResult, accuracy_only_failure, choose, evaluate, table
from toolkit.build.ingest import SourceModel, load_source
from toolkit.build.measure import LatencyConfig
from toolkit.build.package import input_stats, npz_bytes, synthetic_inputs, write
from toolkit.profiles import Profile, Runtime
from toolkit.registry import Registry
from toolkit.signing import SigningKey
from toolkit.build.variants import VariantFactory

Progress = Callable[[str], None]
META_KEYS = {"labels", "preprocessing", "postprocessing", "state"}


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
    variant: str | None = None  # pin the chosen precision, or RUNTIME/PRECISION (must pass the gate)
    min_reference_accuracy: float | None = None  # labelled gate: fp32 floor (default: chance, 1/classes)
    keep_variants: Path | None = None  # keep every variant file in this folder
    unsafe_deserialization: bool = False  # allow Keras Lambda layers (runs Python code from the file)
    state: list[tuple[str, str]] | None = None  # streaming state pairs (None: from --meta, else found by name)
    detect_state: bool = True
    source_origin: dict[str, Any] = field(default_factory=dict)  # where the model came from (MLflow URI…)


@dataclass
class ProfileResult:
    profile: Profile
    variants: list[VariantResult]
    chosen: VariantResult | None = None
    bundle: Path | None = None
    bundle_sha256: str = ""
    notes: list[str] = field(default_factory=list)
    refused: str = ""  # why the profile cannot take this source at all (nothing was built)

    @property
    def verdict(self) -> str:
        if self.bundle:
            return "bundle"
        if self.refused:
            return self.refused
        why = "; ".join(f"{v.runtime}/{v.precision}: {v.reasons[0]}" for v in self.variants if v.reasons)
        return "no variant passed the validation gate" + (f" ({why})" if why else "")

    def to_dict(self) -> dict[str, Any]:
        rt = next((r for r in self.profile.runtimes if self.chosen and r.name == self.chosen.runtime),
                  self.profile.primary)
        return {"profile": self.profile.name, "runtime": f"{rt.name} {rt.version}",
                "runtimes": [f"{r.name} {r.version}" for r in self.profile.runtimes],
                "objective": self.profile.objective,
                "chosen": self.chosen.precision if self.chosen else None,
                "chosen_runtime": self.chosen.runtime if self.chosen else None,
                "bundle": str(self.bundle) if self.bundle else None, "bundle_sha256": self.bundle_sha256,
                "refused": self.refused, "verdict": self.verdict,
                "notes": self.notes, "variants": [v.row() for v in self.variants]}


@dataclass
class BuildResult:
    name: str
    version: int | None  # None: no bundle was written, so no version was registered
    profiles: list[ProfileResult]
    notes: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)  # as signed into every bundle's manifest
    started: float = field(default_factory=time.time)

    @property
    def label(self) -> str:
        return f"v{self.version}" if self.version else "failed build (no version registered)"

    def file_stem(self) -> str:
        """Summary/report file name: NAME-vN, or NAME-failed-TIME when no version was registered."""
        if self.version:
            return f"{self.name}-v{self.version}"
        return f"{self.name}-failed-{time.strftime('%Y%m%d-%H%M%S', time.localtime(self.started))}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "notes": self.notes,
                "provenance": self.provenance, "profiles": [p.to_dict() for p in self.profiles]}

    def table(self) -> str:
        return table([v for p in self.profiles for v in p.variants],
                     [(p.profile.name, p.refused) for p in self.profiles if p.refused])


def model_name(path: Path) -> str:
    """The file's stem, dots included (``ch_ppocr_mobile_v2.0_cls_infer.onnx`` keeps ``v2.0``), with
    characters a bundle name cannot hold replaced by ``-``."""
    stem = path.name if path.is_dir() else path.stem
    name = re.sub(r"[^A-Za-z0-9._-]", "-", stem).lstrip("._-")[:64] or "model"
    return name


def check_name(name: str) -> str:
    if not valid_name(name):
        raise InputError(f"--name {name!r}: a model name is 1-64 characters of letters, digits, '.', '_' "
                         f"and '-', starting with a letter or digit")
    return name


def runtimes_for(source: SourceModel, profile: Profile) -> tuple[list[Runtime], str]:
    """The profile's runtimes this source can go to, or why none (ONNX is not converted to TFLite, a
    .tflite file is bundled as it is)."""
    have = ", ".join(f"{r.name} {r.version}" for r in profile.runtimes)
    if source.kind == "onnx":
        usable = [r for r in profile.runtimes if r.format == "onnx"]
        no_ort = (no_wheels("onnxruntime", profile.arch) or "").split(";")[0]  # no "use rpi3-armv7" hint here
        why = (f"{profile.name} has no ONNX Runtime ({have}){'; ' + no_ort if no_ort else ''}; an ONNX model "
               f"runs only where onnxruntime is (edgeship does not convert ONNX to TFLite: give the Keras or "
               f"SavedModel original)")
    elif source.kind == "tflite":
        usable = [r for r in profile.runtimes if r.format == "tflite"]
        why = f"a .tflite model is bundled as it is, for TFLite runtimes only; {profile.name} has {have}"
    else:
        usable, why = list(profile.runtimes), ""
    return usable, "" if usable else why


def build(opts: BuildOptions, progress: Progress = lambda _msg: None) -> BuildResult:
    progress("loading model")
    source = load_source(opts.model, unsafe=opts.unsafe_deserialization)
    name = check_name(opts.name) if opts.name else model_name(opts.model)
    out_dir = opts.out_dir.resolve()  # the runtime worker runs in another folder
    val = load_dataset(opts.validation, source.inputs, "validation")
    notes: list[str] = []
    unknown = sorted(set(opts.meta) - META_KEYS)
    if unknown:
        notes.append(f"--meta keys {unknown} are not used (known: {', '.join(sorted(META_KEYS))})")
    state_pairs = _state_pairs(opts, source, notes)
    if opts.calibration:
        calib: Dataset = load_dataset(opts.calibration, source.inputs, "calibration")
    else:
        calib = val
        notes.append("no --calibration given: calibrating int8 variants on the validation data")
    train = load_dataset(opts.train, source.inputs, "training") if opts.train else None
    if opts.version is not None and opts.version < 1:
        raise InputError(f"--version {opts.version}: versions start at 1")
    for profile in opts.profiles if opts.version and opts.registry else ():
        if why := opts.registry.taken(name, opts.version, profile.name):  # type: ignore[union-attr]
            raise InputError(f"--version {opts.version}: {why}")
    version: int | None = None  # registered with the first bundle written (a failed build takes none)
    progress("computing fp32 reference outputs")
    reference = source.predict(val.inputs)
    classes = reference[0].shape[1] if reference[0].ndim == 2 and reference[0].shape[1] > 1 else None
    for data in (val, train):
        if data is not None:
            check_labels(data, classes, source.outputs[0].name)
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
    captured = {d.role: d.captured for d in (calib, val, train) if d is not None and d.captured}
    if captured:  # field data: where it came from is signed into the manifest; the data itself never is
        provenance["captured"] = captured
        notes.append("captured field data in " + ", ".join(f"{role} ({c['samples']} samples from "
                                                          f"{len(c['devices'])} device(s), v{'/v'.join(map(str, c['versions']))})"
                                                          for role, c in captured.items()))
    golden_inputs = (synthetic_inputs([s.name for s in source.inputs], val.inputs, stats, opts.golden_count)
                     if val.captured else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    measured: dict = {}  # one measurement per (file, runtime), shared by the profiles
    with tempfile.TemporaryDirectory(prefix="edgeship-build-") as tmp:
        work = Path(tmp)
        if opts.keep_variants:
            work = opts.keep_variants.resolve()
            work.mkdir(parents=True, exist_ok=True)
        bench_inputs = work / "bench_inputs.npz"
        bench_inputs.write_bytes(npz_bytes({s.name: a[:1] for s, a in zip(source.inputs, val.inputs)}))
        eval_inputs = work / "eval_inputs.npz"
        eval_inputs.write_bytes(npz_bytes({s.name: a for s, a in zip(source.inputs, val.inputs)}))
        for profile in opts.profiles:
            usable, refused = runtimes_for(source, profile)
            if refused:
                progress(f"[{profile.name}] refused: {refused}")
                results.append(ProfileResult(profile, [], refused=refused))
                continue
            pr = ProfileResult(profile, [])
            for rt in usable:
                ctx = _Ctx(opts, profile.only(rt), source, calib, val, reference, work, bench_inputs,
                           eval_inputs, progress, keras_model, measured)
                ctx.run(factory, pr)
            _choose(pr, opts.variant)
            if pr.chosen is not None:
                progress(f"[{profile.name}] signing bundle ({pr.chosen.runtime} {pr.chosen.precision})")
                version = _reserve(opts, name, version, profile.name)
                _bundle(pr, opts, out_dir / f"{name}-v{version}-{profile.name}.bundle", work, name=name,
                        version=version, input_names=[s.name for s in source.inputs], val_inputs=val.inputs,
                        golden_inputs=golden_inputs, stats=stats, provenance=provenance, state=state_pairs,
                        output_names=[s.name for s in source.outputs])
            results.append(pr)
    result = BuildResult(name, version, results, notes, provenance)
    failed = [p for p in results if p.bundle is None]
    if failed:
        written = [p.profile.name for p in results if p.bundle is not None]
        why = "; ".join(f"{p.profile.name}: {p.verdict}" for p in failed)
        raise BuildFailed(result, f"no bundle for {len(failed)} of {len(results)} profile(s) ({why})"
                          + (f"; bundles written for: {', '.join(written)}" if written else ""),
                          partial=bool(written))
    return result


def _state_pairs(opts: BuildOptions, source: SourceModel, notes: list[str]) -> list[tuple[str, str]]:
    """The streaming state the bundle declares: --state, else --meta's "state", else found by name."""
    pairs = opts.state if opts.state is not None else state_mod.from_meta(opts.meta)
    if pairs is None and opts.detect_state:
        pairs = state_mod.detect(source.inputs, source.outputs)
        if pairs:
            notes.append(f"streaming state found by name: {', '.join(f'{i} -> {o}' for i, o in pairs)}; the agent keeps "
                         f"it per sequence (sequence_id), or a client sends it itself (--state IN=OUT to say "
                         f"otherwise, --no-state to declare none)")
    return state_mod.check(pairs or [], source.inputs, source.outputs)


def _reserve(opts: BuildOptions, name: str, version: int | None, profile: str) -> int:
    """The build's version for this profile's bundle: reserved in the registry (explicit, the one the
    build already has, or the next free one) right before the bundle is written."""
    if opts.registry is None:
        return version or opts.version or 1
    return opts.registry.reserve(name, profile, version or opts.version)


def _bundle(pr: ProfileResult, opts: BuildOptions, out: Path, work: Path, *, name: str, version: int,
            **package: Any) -> None:
    """Sign the chosen variant into ``out`` for the runtime it was built for, and record it. A failure
    leaves no file claiming a version that was not registered, and releases the reservation."""
    assert pr.chosen is not None
    view = pr.profile.only(next(r for r in pr.profile.runtimes if r.name == pr.chosen.runtime))
    try:
        model_bytes, extra = edgetpu.maybe_compile(pr.chosen, view, work)
        pr.notes += extra
        write(out, name=name, version=version, profile=view, variant=pr.chosen, key=opts.key, meta=opts.meta,
              golden_count=opts.golden_count, model_bytes=model_bytes, **package)
        pr.bundle = out
        pr.bundle_sha256 = hashlib.sha256(out.read_bytes()).hexdigest()
        if opts.registry:
            opts.registry.record(model=name, version=version, profile=pr.profile.name,
                                 variant=pr.chosen.precision, fmt=view.format, size_bytes=pr.chosen.size_bytes,
                                 bundle_path=str(out), bundle_sha256=pr.bundle_sha256, metrics=pr.to_dict())
    except BaseException:
        pr.bundle = None
        out.unlink(missing_ok=True)
        if opts.registry:
            opts.registry.release(name, version, pr.profile.name)
        raise


def _choose(pr: ProfileResult, pinned: str | None) -> None:
    """Pick among every runtime's variants; ``pinned`` is a precision or RUNTIME/PRECISION."""
    p = pr.profile
    if not pinned:
        pr.chosen = choose(pr.variants, p)
        return
    rt, _, precision = pinned.rpartition("/")
    pool = [v for v in pr.variants if v.precision == precision and (not rt or v.runtime == rt)]
    if not pool:
        offered = sorted({f"{v.runtime}/{v.precision}" for v in pr.variants})
        pr.notes.append(f"--variant {pinned}: not produced for this profile (produced: {', '.join(offered)})")
    pr.chosen = choose(pool, p)


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
    measured: dict

    @property
    def runtime_python(self) -> str | None:
        p = self.profile
        return self.opts.runtime_pythons.get(f"{p.runtime}-{p.runtime_version}")

    def run(self, factory: VariantFactory, pr: ProfileResult) -> None:
        """Build and measure the variants of this one-runtime view into ``pr``."""
        p = self.profile
        if p.runtime == "tflite-runtime" and not self.runtime_python:
            pr.notes.append(f"{p.runtime} {p.runtime_version} is not installed on this host: variants "
                            f"were checked in LiteRT only (run `edgeship runtimes install {p.name}`)")
        if self.source.kind == "tflite":
            pr.notes.append("the reference is the .tflite file itself: its fidelity is 1 by construction, "
                            "not a measurement (only that it loads and runs in the runtime is checked)")
        self.progress(f"[{p.name}] converting for {p.runtime}")
        variants = []
        for cand in factory.candidates(p):
            v = VariantResult(p.name, cand.precision, None, runtime=p.runtime, notes=list(cand.notes))
            variants.append(v)
            if cand.data is None:
                v.reasons.append(cand.error)
                continue
            v.file = self.work / f"{p.name}-{cand.precision}{FORMATS[p.format]}"
            v.file.write_bytes(cand.data)
            self.progress(f"[{p.name}] measuring {p.runtime} {cand.precision}")
            self._evaluate(v)
        int8 = next((v for v in variants if v.precision == "int8"), None)
        if int8 is not None and accuracy_only_failure(int8) and self.opts.selective and p.format == "tflite":
            if p.edgetpu:
                pr.notes.append("full int8 failed accuracy; selective quantization is not possible "
                                "on the Edge TPU (it runs integer ops only)")
            elif self.source.is_tf:
                self.progress(f"[{p.name}] repairing int8 with selective quantization")
                variants.append(self._repair(int8))
        pr.variants += variants

    def _evaluate(self, v: VariantResult) -> VariantResult:
        evaluate(v, self.profile, self.eval_inputs, self.reference, self.val.labels,
                 [s.name for s in self.source.outputs], self.bench_inputs, self.opts.latency,
                 self.runtime_python, self.measured, self.opts.min_reference_accuracy)
        if self.source.kind == "tflite" and v.metrics:
            v.metrics["reference"] = "self"
        return v

    def _repair(self, int8: VariantResult) -> VariantResult:
        p = self.profile
        v = VariantResult(p.name, "int8-selective", self.work / f"{p.name}-int8-selective.tflite",
                          runtime=p.runtime)
        if p.format != "tflite":
            v.reasons.append("selective quantization is implemented for TFLite profiles")
            return v

        trials: list[VariantResult] = []

        def accept(model: bytes) -> bool:
            assert v.file is not None
            v.file.write_bytes(model)
            trials.append(self._evaluate(VariantResult(p.name, v.precision, v.file, runtime=p.runtime)))
            return trials[-1].passed

        try:
            found = selective.repair(self.source, self.calib.inputs, accept, keras_model=self.keras_model)
        except ConversionError as exc:
            v.reasons.append(str(exc))
            return v
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
    atomic_write(path, json.dumps(result.to_dict(), indent=2, sort_keys=True, default=str).encode(), public=True)


