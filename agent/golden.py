"""Replay a bundle's golden set: the model must reproduce the reference outputs within tolerance
(and produce no NaN/Inf) before an update may go live."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from agent.errors import BundleError, ModelError
from agent.manifest import Manifest
from agent.runtime import Model

MAX_GOLDEN_BYTES = 64 << 20


def load_golden(path: Path) -> dict[str, np.ndarray]:
    """Read golden.npz, refusing archives that would inflate beyond the limit (zip bombs)."""
    try:
        with zipfile.ZipFile(path) as zf:
            total = sum(i.file_size for i in zf.infolist())
            if total > MAX_GOLDEN_BYTES:
                raise BundleError(f"{path}: golden set inflates to {total} bytes (limit {MAX_GOLDEN_BYTES})")
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{path}: unreadable golden set ({exc})") from exc


def replay(model: Model, manifest: Manifest, folder: Path) -> float:
    """Run the golden inputs; return the worst |error| or raise ModelError naming the output."""
    if not manifest.golden:
        raise BundleError(f"{manifest.id}: bundle has no golden set")
    data = load_golden(folder / manifest.golden["path"])
    atol, rtol = float(manifest.golden["atol"]), float(manifest.golden["rtol"])
    try:
        feed = {s.name: data[f"in.{s.name}"] for s in model.inputs}
    except KeyError as exc:
        raise BundleError(f"{manifest.id}: golden set lacks input {exc}") from exc
    outputs = model.predict(feed)
    worst = 0.0
    for name, got in outputs.items():
        want = data.get(f"out.{name}")
        if want is None:
            raise BundleError(f"{manifest.id}: golden set lacks output {name!r}")
        if not np.isfinite(got).all():
            raise ModelError(f"{manifest.id}: output {name!r} contains NaN/Inf on the golden set")
        got = got.reshape(want.shape)
        err = np.abs(got - want)
        bad = err > atol + rtol * np.abs(want)
        if bad.any():
            raise ModelError(f"{manifest.id}: output {name!r} differs from the golden set "
                             f"(max |error| {float(err.max()):.4g} > atol {atol:g} + rtol {rtol:g})")
        worst = max(worst, float(err.max()))
    return worst
