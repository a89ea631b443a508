"""Replay a bundle's golden set: the model must reproduce the reference outputs within tolerance
(and produce no NaN/Inf) before an update may go live.

The golden arrays follow the sample layout of ``agent.layout``, like every data file: ``in.<name>``
holds N samples of an input, ``out.<name>`` the outputs the host measured for them. Float outputs must
match within ``atol + rtol * |expected|``; integer outputs (class ids, token ids) must be equal in at
least ``INT_AGREEMENT`` of their elements (a near-tie may flip on another CPU)."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from agent.errors import BundleError, ModelError
from agent.manifest import Manifest
from agent.runtime import Model

MAX_GOLDEN_BYTES = 64 << 20
MAX_GOLDEN_ARRAYS = 64
MAX_NPY_HEADER = 10_000  # numpy's own default limit for .npy headers
INT_AGREEMENT = 0.99


def load_golden(path: Path, max_bytes: int = MAX_GOLDEN_BYTES) -> dict[str, np.ndarray]:
    """Read golden.npz. Every size it declares is checked before anything is allocated: the zip's
    uncompressed sizes (zip bombs), and each .npy header's shape x itemsize (an array header may declare
    terabytes that numpy would try to allocate)."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_GOLDEN_ARRAYS:
                raise BundleError(f"{path}: golden set holds {len(infos)} entries (limit {MAX_GOLDEN_ARRAYS})")
            total = sum(i.file_size for i in infos)
            if total > max_bytes:
                raise BundleError(f"{path}: golden set inflates to {total} bytes (limit {max_bytes})")
            declared = sum(_declared_bytes(zf, info, path) for info in infos)
            if declared > max_bytes:
                raise BundleError(f"{path}: golden arrays declare {declared} bytes (limit {max_bytes})")
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{path}: unreadable golden set ({exc})") from exc


def _declared_bytes(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> int:
    """The bytes one .npy member's header says its array needs, read from the header alone."""
    where = f"{path}:{info.filename}"
    if not info.filename.endswith(".npy"):
        raise BundleError(f"{where}: the golden set may hold .npy arrays only")
    with zf.open(info) as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fh, max_header_size=MAX_NPY_HEADER)
        header_len = fh.tell()
    if dtype.hasobject:
        raise BundleError(f"{where}: object arrays are refused")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > info.file_size - header_len:
        raise BundleError(f"{where}: header declares {nbytes} bytes of data ({shape} {dtype}) but the entry "
                          f"holds {max(0, info.file_size - header_len)}")
    return nbytes


def replay(model: Model, manifest: Manifest, folder: Path) -> float:
    """Run the golden inputs; return the worst |error| or raise ModelError naming the output."""
    if not manifest.golden:
        raise BundleError(f"{manifest.id}: bundle has no golden set")
    data = load_golden(folder / manifest.golden["path"])
    atol, rtol = float(manifest.golden["atol"]), float(manifest.golden["rtol"])
    layout = manifest.golden.get("layout", model.layout)
    if layout != model.layout:
        raise BundleError(f"{manifest.id}: golden set is laid out as {layout!r} but the model's inputs "
                          f"call for {model.layout!r} (see docs/bundle.md)")
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
        if got.size != want.size:
            raise ModelError(f"{manifest.id}: output {name!r} has shape {got.shape} on the golden set, "
                             f"expected {want.shape}")
        got = got.reshape(want.shape)
        if got.dtype.kind in "iub" and want.dtype.kind in "iub":
            agree = float(np.mean(got == want)) if want.size else 1.0
            if agree < INT_AGREEMENT:
                raise ModelError(f"{manifest.id}: output {name!r} differs from the golden set "
                                 f"({agree:.1%} of its values equal, need {INT_AGREEMENT:.0%})")
            continue
        if not np.isfinite(got).all():
            raise ModelError(f"{manifest.id}: output {name!r} contains NaN/Inf on the golden set")
        err = np.abs(got.astype(np.float64) - want)
        bad = err > atol + rtol * np.abs(want)
        if bad.any():
            raise ModelError(f"{manifest.id}: output {name!r} differs from the golden set "
                             f"(max |error| {float(err.max()):.4g} > atol {atol:g} + rtol {rtol:g})")
        worst = max(worst, float(err.max()) if err.size else 0.0)
    return worst
