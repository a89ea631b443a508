"""The validation gate: measure each variant against the fp32 reference and the profile's budgets,
then choose the best passing variant by the profile's objective."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.build.measure import LatencyConfig, compare, run_worker
from toolkit.profiles import Profile


@dataclass
class VariantResult:
    profile: str
    precision: str
    file: Path | None
    size_bytes: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    passed: bool = False
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)
    chosen: bool = False

    def row(self) -> dict[str, Any]:
        return {"profile": self.profile, "precision": self.precision, "size_bytes": self.size_bytes,
                "metrics": self.metrics, "latency": self.latency, "passed": self.passed,
                "reasons": self.reasons, "notes": self.notes, "float_layers": self.float_layers,
                "chosen": self.chosen}


def _outputs(npz_path: Path, output_names: list[str]) -> list[np.ndarray]:
    """Worker outputs in the source model's output order (by name, else positional)."""
    with np.load(npz_path) as npz:
        items = sorted(((int(k.split(":", 1)[0]), k.split(":", 1)[1], npz[k]) for k in npz.files))
    by_name = {name: arr for _, name, arr in items}
    if all(n in by_name for n in output_names):
        return [by_name[n] for n in output_names]
    return [arr for _, _, arr in items]


def evaluate(v: VariantResult, profile: Profile, eval_inputs: Path, reference: list[np.ndarray],
             labels: np.ndarray | None, output_names: list[str], bench_inputs: Path,
             cfg: LatencyConfig, runtime_python: str | None) -> VariantResult:
    """Run the variant in a separate runtime process (a crashing model cannot take the build down):
    outputs on the validation inputs, then the benchmark; then apply the gate."""
    assert v.file is not None
    v.size_bytes = v.file.stat().st_size
    prefer = "tflite-runtime" if profile.runtime == "tflite-runtime" and runtime_python else None
    threads = min(profile.threads, os.cpu_count() or 1)  # more threads than cores only measures contention
    out_npz = v.file.with_suffix(".outputs.npz")
    lat = run_worker(v.file, threads, bench_inputs, cfg, python=runtime_python, prefer=prefer,
                     eval_inputs=eval_inputs, eval_out=out_npz)
    if not lat.get("ok"):
        where = f"{profile.runtime} {profile.runtime_version}" if runtime_python else "the runtime"
        v.reasons.append(f"does not load or run in {where}: {lat.get('error')}")
        return v
    v.metrics = compare(_outputs(out_npz, output_names), reference, labels)
    out_npz.unlink(missing_ok=True)
    v.latency = lat
    lat["threads"] = threads
    if runtime_python:
        v.notes.append(f"loaded and measured in {lat.get('runtime')} {lat.get('runtime_version')} "
                       f"(numpy {lat.get('numpy')})")
    return gate(v, profile, cfg)


def gate(v: VariantResult, profile: Profile, cfg: LatencyConfig) -> VariantResult:
    m, lat = v.metrics, v.latency
    if not m.get("finite", True) or not lat.get("finite", True):
        v.reasons.append("outputs contain NaN/Inf")
    if "accuracy_drop_points" in m:
        if m["accuracy_drop_points"] > profile.max_accuracy_drop:
            v.reasons.append(f"accuracy drop {m['accuracy_drop_points']:.2f} pts > "
                             f"{profile.max_accuracy_drop:g}")
    elif "top1_agreement" in m:
        if m["top1_agreement"] < profile.min_agreement:
            v.reasons.append(f"top-1 agreement {m['top1_agreement']:.3f} < {profile.min_agreement:g}")
    elif m.get("snr_db", 99) < profile.min_snr_db:
        v.reasons.append(f"SNR {m['snr_db']:.1f} dB < {profile.min_snr_db:g} dB")
    mb = v.size_bytes / 1e6
    if mb > profile.max_model_mb:
        v.reasons.append(f"size {mb:.2f} MB > {profile.max_model_mb:g} MB")
    if lat.get("peak_rss_mb", 0) > profile.max_ram_mb:
        v.reasons.append(f"peak RSS {lat['peak_rss_mb']:.0f} MB > {profile.max_ram_mb:g} MB")
    if cfg.enabled and "p95_ms" in lat:
        est = lat["p95_ms"] * profile.device_slowdown
        lat["device_p95_ms_est"] = est
        if est > profile.max_p95_ms and cfg.gate:
            v.reasons.append(f"est. device p95 {est:.1f} ms > {profile.max_p95_ms:g} ms "
                             f"(host {lat['p95_ms']:.2f} ms x{profile.device_slowdown:g})")
    v.passed = not v.reasons
    return v


def accuracy_only_failure(v: VariantResult) -> bool:
    return bool(v.reasons) and all(r.startswith(("accuracy drop", "top-1 agreement", "SNR"))
                                   for r in v.reasons)


def choose(results: list[VariantResult], profile: Profile) -> VariantResult | None:
    ok = [r for r in results if r.passed]
    if not ok:
        return None
    base = lambda r: r.precision.split("-")[0] if r.precision.startswith("int8") else r.precision  # noqa: E731
    pref = {p: i for i, p in enumerate(profile.precisions)}
    rank = lambda r: pref.get(r.precision, pref.get(base(r), len(pref)))  # noqa: E731
    if profile.objective == "size":
        best = min(ok, key=lambda r: (r.size_bytes, rank(r)))
    elif profile.objective == "latency" and all("p50_ms" in r.latency for r in ok):
        # within 5% of the fastest is a tie (measurement noise): then the profile's preference decides
        fastest = min(r.latency["p50_ms"] for r in ok)
        best = min((r for r in ok if r.latency["p50_ms"] <= fastest * 1.05),
                   key=lambda r: (rank(r), r.latency["p50_ms"]))
    else:
        best = min(ok, key=lambda r: (rank(r), r.size_bytes))
    best.chosen = True
    return best


def table(results: list[VariantResult]) -> str:
    from toolkit.units import fmt_ms

    lines = [f"{'profile':<18} {'variant':<15} {'size MB':>8} {'acc/agree':>10} {'p50':>9}  result"]
    for r in results:
        acc = r.metrics.get("accuracy", r.metrics.get("top1_agreement"))
        p50 = r.latency.get("p50_ms")
        verdict = "CHOSEN" if r.chosen else "pass" if r.passed else "FAIL: " + "; ".join(r.reasons)
        lines.append(f"{r.profile:<18} {r.precision:<15} {r.size_bytes / 1e6:>8.3f} "
                     f"{'-' if acc is None else f'{acc:.4f}':>10} "
                     f"{fmt_ms(p50):>9}  {verdict}")
    return "\n".join(lines)
