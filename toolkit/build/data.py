"""Calibration, validation and training data: ``.npz`` files checked against the model's inputs.

An npz holds one array per model input, keyed by input name (``x`` also works for a single input),
and optionally labels under ``y``; an export of captured predictions (`edgeship capture export`) also
carries its provenance (toolkit/capture/export.py), which the build signs into the manifest. Axis 0 counts samples, laid out as ``agent.layout`` says: batched
along axis 0 for models whose inputs all have a leading batch axis, else N samples stacked on a new
leading axis, each the input exactly as the model takes it. Everything is checked (keys, shapes,
dtypes, whole numbers for integer inputs, finiteness) and refused with a message naming the file and
the array.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.layout import BATCH, describe, layout_of, sample_shape
from agent.runtime import cast_problem
from toolkit.errors import InputError, ToolkitError
from toolkit.build.ingest import IOSpec

LABEL_KEYS = ("y", "labels")


@dataclass
class Dataset:
    path: Path
    sha256: str
    inputs: list[np.ndarray]  # in model input order: float32 for float inputs, else the input's dtype
    labels: np.ndarray | None
    role: str = "validation"
    captured: dict | None = None  # the provenance of captured field data (devices, versions, reasons...)

    @property
    def size(self) -> int:
        return int(self.inputs[0].shape[0])

    def take(self, n: int) -> list[np.ndarray]:
        return [a[:n] for a in self.inputs]


def load_dataset(path: str | Path, specs: list[IOSpec], role: str) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{role} data {path}: file not found")
    names = [s.name for s in specs]
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{role} data {path}: not a readable .npz file ({exc})") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):  # a .npy: one bare array, no names, no labels
        raise InputError(f"{role} data {path}: a .npy file holds one unnamed array; give an .npz with one "
                         f"array per model input named {names} (or x) and optional labels y, e.g. "
                         f"numpy.savez(\"{path.stem}.npz\", x=inputs, y=labels)")
    try:
        with loaded as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{role} data {path}: not a readable .npz file ({exc})") from exc
    if all(n in arrays for n in names):
        keys = names
    elif len(specs) == 1 and "x" in arrays:
        keys = ["x"]
    else:
        raise InputError(f"{role} data {path}: needs one array per model input named "
                         f"{names}{' (or x)' if len(specs) == 1 else ''}; found {sorted(arrays)}")
    layout = layout_of([s.shape for s in specs])
    inputs = []
    for spec, key in zip(specs, keys):
        a = arrays[key]
        where = f"{role} data {path}: array {key!r}"
        if a.dtype.kind not in "fiub":
            raise InputError(f"{where} has dtype {a.dtype}; expected numbers for input {spec.name!r}")
        want = sample_shape(spec.shape, layout)
        if a.ndim != len(want) + 1 or any(w not in (-1, g) for w, g in zip(want, a.shape[1:])):
            how = "" if layout == BATCH else (" (N samples stacked on a new leading axis, each exactly "
                                              "as the model takes it: see README, Data files)")
            raise InputError(f"{where} has shape {a.shape}; model input {spec.name!r} expects "
                             f"{describe(spec.shape, layout)}{how}")
        if a.shape[0] == 0:
            raise InputError(f"{where} is empty")
        inputs.append(_as_dtype(a, spec, where))
    if len({a.shape[0] for a in inputs}) > 1:
        counts = ", ".join(f"{s.name!r}: {a.shape[0]}" for s, a in zip(specs, inputs))
        raise InputError(f"{role} data {path}: input arrays have different sample counts ({counts})")
    labels = next((arrays[k] for k in LABEL_KEYS if k in arrays), None)
    if labels is not None:
        if labels.shape[0] != inputs[0].shape[0] or labels.dtype.kind not in "iu":
            raise InputError(f"{role} data {path}: labels 'y' must be integer class ids, one per "
                             f"sample ({inputs[0].shape[0]}); got shape {labels.shape} {labels.dtype}")
        labels = labels.reshape(-1).astype(np.int64)
    from toolkit.capture.export import read_provenance

    try:
        captured = read_provenance(arrays, f"{role} data {path}")
    except ToolkitError as exc:
        raise InputError(str(exc)) from exc
    return Dataset(path, hashlib.sha256(path.read_bytes()).hexdigest(), inputs, labels, role, captured)


def check_labels(data: Dataset, classes: int | None, output: str) -> None:
    """Refuse labels that are not class indices of the model's classifier output (before any work: a
    gate against labels the model cannot predict would pass every variant at accuracy 0)."""
    if data.labels is None or classes is None:
        return
    lo, hi = int(data.labels.min()), int(data.labels.max())
    if lo < 0 or hi >= classes:
        bad = int(np.count_nonzero((data.labels < 0) | (data.labels >= classes)))
        raise InputError(f"{data.role} data {data.path}: labels y range {lo}..{hi}, but output {output!r} has "
                         f"{classes} classes (0..{classes - 1}); {bad} of {data.labels.size} labels are outside. "
                         f"Labels must be class indices of the model's output")


def _as_dtype(a: np.ndarray, spec: IOSpec, where: str) -> np.ndarray:
    """float32 for float inputs (finite; an array in a quantized input's own integer dtype holds raw quantized
    values and is dequantized); the input's own dtype for integer and bool inputs, refusing values that the
    cast would change."""
    dt = np.dtype(spec.dtype)
    if spec.quant is not None and a.dtype == np.dtype(spec.quant[2]):  # raw quantized values, as the model takes
        scale, zero_point, _ = spec.quant
        a = (a.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)
    if dt.kind == "f":
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise InputError(f"{where} contains NaN or Inf")
        return a
    problem = cast_problem(a, dt)
    if problem:
        raise InputError(f"{where}: model input {spec.name!r} takes {dt.name} values; the array holds "
                         f"{problem}")
    return a.astype(dt)
