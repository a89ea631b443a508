"""Turn a chosen variant into a signed, reproducible bundle (manifest, model, golden set)."""

from __future__ import annotations

import io
import os
import platform
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import write_bundle
from agent.manifest import FORMATS, Manifest
from agent.runtime import Model, load_model
from toolkit import __version__
from toolkit.build.gate import VariantResult
from toolkit.profiles import Profile
from toolkit.signing import SigningKey

GOLDEN_FILE = "golden.npz"


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz with fixed timestamps (numpy's own savez stamps the current time)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            arr = io.BytesIO()
            np.lib.format.write_array(arr, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, arr.getvalue())
    return buf.getvalue()


GOLDEN_BUDGET = 1 << 20  # bytes of golden inputs + outputs in a bundle (at least one sample)


def _g(x: float) -> float:
    return float(f"{float(x):.6g}")


def input_stats(names: list[str], arrays: list[np.ndarray]) -> list[dict[str, Any]]:
    """Per-input summary of the calibration data, for drift checks on the device. Float inputs only:
    token ids, lengths or a sample rate have no distribution to drift from."""
    out = []
    for name, a in zip(names, arrays):
        if a.dtype.kind != "f":
            continue
        flat = a.reshape(-1)
        if flat.size > 200_000:
            flat = flat[:: flat.size // 200_000 + 1]
        q = np.quantile(flat, np.linspace(0, 1, 11))
        edges = np.unique(q[1:-1])  # bin k holds edges[k-1] < x <= edges[k] (ties make fewer bins)
        p = np.bincount(np.searchsorted(edges, flat, side="left"), minlength=len(edges) + 1) / flat.size
        out.append({"name": name, "mean": _g(flat.mean()), "std": _g(flat.std()),
                    "deciles": [_g(x) for x in q], "samples": int(a.shape[0]),
                    "bins": {"edges": [_g(x) for x in edges], "p": [_g(x) for x in p]}})
    return out


def synthetic_inputs(names: list[str], arrays: list[np.ndarray], stats: list[dict[str, Any]], count: int,
                     seed: int = 0) -> list[np.ndarray]:
    """``count`` samples shaped like ``arrays`` but made up: each float value drawn from the reference bins
    of ``stats`` (a bin by its probability, then uniformly within it), integer inputs from the range the
    data spans. The golden set of a build whose validation data is captured field data is made of these:
    captured samples never enter a bundle."""
    rng = np.random.default_rng(seed)
    by_name = {s["name"]: s for s in stats}
    out = []
    for name, a in zip(names, arrays):
        shape = (min(count, a.shape[0]), *a.shape[1:])
        st = by_name.get(name) if a.dtype.kind == "f" else None
        if st is not None:
            q, p = st["deciles"], np.asarray(st["bins"]["p"], np.float64)
            edges = [q[0], *st["bins"]["edges"], q[-1]]
            k = rng.choice(len(p), size=shape, p=p / p.sum())
            lo, hi = np.take(edges, k), np.take(edges, k + 1)
            out.append((lo + rng.random(shape) * (hi - lo)).astype(a.dtype))
        elif a.dtype.kind in "iub":
            lo, hi = int(a.min()), int(a.max())
            out.append(rng.integers(lo, hi + 1, size=shape).astype(a.dtype))
        else:
            out.append(rng.uniform(float(a.min()), float(a.max()), size=shape).astype(a.dtype))
    return out


def model_feed(model: Model, names: list[str], arrays: list[np.ndarray]) -> dict[str, np.ndarray] | list:
    """Source-ordered arrays as a feed for a variant: by name, or by position when the converter
    renamed the inputs."""
    by_name = dict(zip(names, arrays))
    if all(s.name in by_name for s in model.inputs):
        return {s.name: by_name[s.name] for s in model.inputs}
    return list(arrays)


def output_stats(model: Model, feed: dict[str, np.ndarray] | list, limit: int = 512) -> list[dict[str, Any]]:
    """Predicted-class distribution of each float classifier-shaped output ([N, C], 2 <= C <= 1000)
    on held-out data: the device compares what it predicts in the field with it."""
    res = model.predict(_head(feed, limit))
    out = []
    for spec in model.outputs:
        y = res[spec.name]
        if y.dtype.kind == "f" and y.ndim == 2 and 2 <= y.shape[1] <= 1000:
            p = np.bincount(y.argmax(1), minlength=y.shape[1]) / y.shape[0]
            out.append({"name": spec.name, "classes": int(y.shape[1]), "p": [_g(x) for x in p]})
    return out


def _head(feed: dict[str, np.ndarray] | list, n: int) -> dict[str, np.ndarray] | list:
    return {k: a[:n] for k, a in feed.items()} if isinstance(feed, dict) else [a[:n] for a in feed]


def golden_set(model: Model, feed: dict[str, np.ndarray] | list, count: int,
               half: bool = False) -> tuple[dict[str, np.ndarray], float]:
    """Inputs and the variant's own outputs on them (N samples in the ``agent.layout`` of the model),
    with an absolute tolerance for the float outputs' replay on device (``half``: fp16 weights, whose
    results vary more across CPUs). Integer outputs are kept as they are and replayed exactly."""
    arranged = model.arrange(_head(feed, count))
    res = model.run(arranged)
    arrays = {f"in.{s.name}": a for s, a in zip(model.inputs, arranged)}
    atol = 0.0
    for spec in model.outputs:
        out = res[spec.name]
        if out.dtype.kind in "iub":
            arrays[f"out.{spec.name}"] = out
            continue
        arrays[f"out.{spec.name}"] = out.astype(np.float32)
        peak = float(np.max(np.abs(out))) if out.size else 0.0
        tol = 3 * spec.scale if spec.quantized else 1e-3 * (1.0 + peak)
        if spec.dtype == "float16" or half:
            tol = max(tol, 1e-2 * (1.0 + peak))
        atol = max(atol, tol)
    return arrays, _g(atol)


def _versions() -> dict[str, str]:
    out = {"edgeship": __version__, "python": platform.python_version()}
    for dist in ("tensorflow", "tf-keras", "tensorflow-model-optimization", "tf2onnx", "onnx",
                 "onnxruntime", "ai-edge-litert", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def write(out: Path, *, name: str, version: int, profile: Profile, variant: VariantResult,
          key: SigningKey, input_names: list[str], val_inputs: list[np.ndarray], stats: list[dict[str, Any]],
          meta: dict[str, Any], provenance: dict[str, Any], golden_count: int = 8,
          model_bytes: bytes | None = None, golden_inputs: list[np.ndarray] | None = None,
          state: list[tuple[str, str]] = (), output_names: list[str] = ()) -> Manifest:
    """``profile`` is the one-runtime view the variant was built for; ``val_inputs`` are in the
    source model's input order (``input_names``); the golden set is made from ``golden_inputs`` when
    given (instead of the first validation samples); ``state`` pairs name the source's tensors
    (``output_names`` is the source's output order, to find them in the variant)."""
    assert variant.file is not None
    model = load_model(variant.file, threads=min(profile.threads, os.cpu_count() or 1))
    feed = model_feed(model, input_names, val_inputs)
    gfeed = feed if golden_inputs is None else model_feed(model, input_names, golden_inputs)
    one = model.predict(_head(gfeed, 1))
    per_sample = sum(a[:1].nbytes for a in val_inputs) + sum(o.nbytes for o in one.values())
    count = max(1, min(golden_count, GOLDEN_BUDGET // max(per_sample, 1)))  # image models: few samples
    golden, atol = golden_set(model, gfeed, count, half=variant.precision == "fp16")
    model_file = "model" + FORMATS[profile.format]
    m = variant.metrics
    metrics = {k: (_g(v) if isinstance(v, float) else v) for k, v in m.items()
               if k in ("accuracy", "reference_accuracy", "accuracy_drop_points", "top1_agreement",
                        "max_abs_error", "snr_db", "int_agreement", "task", "reference")}
    manifest: dict[str, Any] = {
        "name": name, "version": version, "profile": profile.name, "arch": profile.arch,
        "format": profile.format, "precision": variant.precision,
        "runtime": {"name": profile.runtime, "min_version": profile.runtime_version,
                    "threads": profile.threads, "delegate": profile.delegate,
                    "execution_providers": list(profile.execution_providers),
                    **({"numpy": profile.numpy} if profile.numpy else {})},
        "model": {"path": model_file, "float_layers": variant.float_layers},
        "inputs": [s.to_dict() for s in model.inputs],
        "outputs": [s.to_dict() for s in model.outputs],
        "golden": {"path": GOLDEN_FILE, "count": int(next(iter(golden.values())).shape[0]),
                   "atol": atol, "rtol": 1e-3, "layout": model.layout},
        "labels": [str(x) for x in meta.get("labels", [])],
        "preprocessing": meta.get("preprocessing", {}),
        "postprocessing": meta.get("postprocessing", {}),
        **({"state": _state(state, model, input_names, output_names)} if state else {}),
        "input_stats": stats,
        "output_stats": output_stats(model, feed),
        "metrics": {**metrics, "size_bytes": variant.size_bytes},
        "provenance": {**provenance, "profile_sha256": profile.sha256, "tools": _versions()},
    }
    files = {model_file: model_bytes if model_bytes is not None else variant.file.read_bytes(),
             GOLDEN_FILE: npz_bytes(golden)}
    return write_bundle(out, manifest, files, key.sign, key.key_id)


def _state(pairs: list[tuple[str, str]], model: Model, input_names: list[str],
           output_names: list[str]) -> list[dict[str, str]]:
    """The state pairs in the variant's own tensor names (a converter may rename; the order stays)."""
    def find(name: str, source: list[str], specs: tuple) -> str:
        names = [s.name for s in specs]
        return name if name in names else names[source.index(name)]
    return [{"input": find(i, input_names, model.inputs), "output": find(o, list(output_names), model.outputs)}
            for i, o in pairs]
