"""The validation gate: measure each variant against the fp32 reference and the profile's budgets,
then choose the best passing variant by the profile's objective.

A file is measured once per runtime, even when several profiles take it (``cache``). A variant over
the latency budget is measured again before it is refused, and the median of the runs' p95s decides:
one noisy run (a host hiccup) cannot refuse a model.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.build.measure import LatencyConfig, compare, run_worker
from toolkit.profiles import Profile

FIDELITY_REASONS = ("accuracy drop", "top-1 agreement", "SNR", "integer outputs")


@dataclass
class VariantResult:
    profile: str
    precision: str
    file: Path | None
    runtime: str = ""  # the runtime this variant is for (a profile may offer several)
    size_bytes: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    passed: bool = False
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)
    chosen: bool = False

    def row(self) -> dict[str, Any]:
        return {"profile": self.profile, "runtime": self.runtime, "precision": self.precision,
                "size_bytes": self.size_bytes,
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
             cfg: LatencyConfig, runtime_python: str | None, cache: dict | None = None,
             min_reference: float | None = None) -> VariantResult:
    """Run the variant in a separate runtime process (a crashing model cannot take the build down):
    outputs on the validation inputs, then the benchmark; then apply the gate. ``cache`` shares the
    measurement of identical files in the same runtime between profiles."""
    assert v.file is not None
    data = v.file.read_bytes()
    v.size_bytes = len(data)
    prefer = "tflite-runtime" if profile.runtime == "tflite-runtime" and runtime_python else None
    threads = min(profile.threads, os.cpu_count() or 1)  # more threads than cores only measures contention
    key = (hashlib.sha256(data).hexdigest(), prefer, runtime_python, threads)
    if cache is None or key not in cache:
        out_npz = v.file.with_name(v.file.name + ".outputs.npz")
        lat = run_worker(v.file, threads, bench_inputs, cfg, python=runtime_python, prefer=prefer,
                         eval_inputs=eval_inputs, eval_out=out_npz)
        metrics = compare(_outputs(out_npz, output_names), reference, labels) if lat.get("ok") else {}
        out_npz.unlink(missing_ok=True)
        lat["threads"] = threads
        if cache is not None:
            cache[key] = (metrics, lat)
    else:
        metrics, lat = cache[key]
    if not lat.get("ok"):
        where = f"{profile.runtime} {profile.runtime_version}" if runtime_python else "the runtime"
        v.reasons.append(f"does not load or run in {where}: {lat.get('error')}")
        return v
    if _over_budget(lat, profile, cfg) and "p95_runs_ms" not in lat:
        _remeasure(lat, v.file, threads, bench_inputs, cfg, runtime_python, prefer)
    v.metrics, v.latency = copy.deepcopy(metrics), copy.deepcopy(lat)
    if runtime_python:
        v.notes.append(f"loaded and measured in {lat.get('runtime')} {lat.get('runtime_version')} "
                       f"(numpy {lat.get('numpy')})")
    return gate(v, profile, cfg, min_reference)


def reference_failure(m: dict[str, Any], floor: float | None = None) -> str | None:
    """With labels, every variant is judged by its drop from the fp32 reference; a reference that does not
    reach chance (1/classes) or ``floor`` on these labels means the labels do not fit the model (wrong
    order, wrong file), and a 0.0-point drop from an accuracy of 0 would pass anything."""
    ref = m.get("reference_accuracy")
    if ref is None or not m.get("classes"):
        return None
    limit, what = (floor, "--min-reference-accuracy") if floor is not None else \
        (1.0 / m["classes"], f"chance for {m['classes']} classes")
    if ref < limit:
        return f"fp32 reference accuracy {ref:.4f} < {limit:.4f} ({what}): do the labels fit the model?"
    return None


def _over_budget(lat: dict[str, Any], profile: Profile, cfg: LatencyConfig) -> bool:
    return cfg.enabled and cfg.gate and "p95_ms" in lat and \
        lat["p95_ms"] * profile.device_slowdown > profile.max_p95_ms


def _remeasure(lat: dict[str, Any], file: Path, threads: int, bench_inputs: Path, cfg: LatencyConfig,
               python: str | None, prefer: str | None) -> None:
    """Measure ``cfg.remeasure`` more times and keep the run with the median p95 (in place): every
    percentile then comes from one run, and one noisy run cannot decide."""
    runs = [dict(lat)]
    for _ in range(cfg.remeasure):
        again = run_worker(file, threads, bench_inputs, cfg, python=python, prefer=prefer)
        if again.get("ok") and "p95_ms" in again:
            runs.append(again)
    p95s = [r["p95_ms"] for r in runs]
    median = sorted(runs, key=lambda r: r["p95_ms"])[(len(runs) - 1) // 2]
    lat.update({k: v for k, v in median.items() if k.endswith("_ms") and not k.startswith("init")})
    lat["p95_runs_ms"] = p95s


def gate(v: VariantResult, profile: Profile, cfg: LatencyConfig, min_reference: float | None = None) -> VariantResult:
    m, lat = v.metrics, v.latency
    if not m.get("finite", True) or not lat.get("finite", True):
        v.reasons.append("outputs contain NaN/Inf")
    if why := reference_failure(m, min_reference):
        v.reasons.append(why)
    if "accuracy_drop_points" in m:
        if m["accuracy_drop_points"] > profile.max_accuracy_drop:
            v.reasons.append(f"accuracy drop {m['accuracy_drop_points']:.2f} pts > "
                             f"{profile.max_accuracy_drop:g}")
    elif "top1_agreement" in m:
        if m["top1_agreement"] < profile.min_agreement:
            v.reasons.append(f"top-1 agreement {m['top1_agreement']:.3f} < {profile.min_agreement:g}")
    elif m.get("snr_db", 99) < profile.min_snr_db:
        v.reasons.append(f"SNR {m['snr_db']:.1f} dB < {profile.min_snr_db:g} dB")
    if m.get("int_agreement", 1.0) < profile.min_agreement:
        v.reasons.append(f"integer outputs agree on {m['int_agreement']:.3f} of values < {profile.min_agreement:g}")
    mb = v.size_bytes / 1e6
    if mb > profile.max_model_mb:
        v.reasons.append(f"size {mb:.2f} MB > {profile.max_model_mb:g} MB")
    if lat.get("peak_rss_mb", 0) > profile.max_ram_mb:
        v.reasons.append(f"peak RSS {lat['peak_rss_mb']:.0f} MB > {profile.max_ram_mb:g} MB")
    if cfg.enabled and "p95_ms" in lat:
        est = lat["p95_ms"] * profile.device_slowdown
        lat["device_p95_ms_est"] = est
        if est > profile.max_p95_ms and not cfg.gate:
            v.notes.append(f"est. device p95 {est:.1f} ms is over the {profile.max_p95_ms:g} ms budget; not "
                           f"enforced with these short timing runs (--quick)")
        if est > profile.max_p95_ms and cfg.gate:
            runs = lat.get("p95_runs_ms")
            host = (f"median host p95 of {len(runs)} runs ({', '.join(f'{r:.2f}' for r in runs)}) "
                    f"{lat['p95_ms']:.2f} ms" if runs else f"host {lat['p95_ms']:.2f} ms")
            v.reasons.append(f"est. device p95 {est:.1f} ms > {profile.max_p95_ms:g} ms "
                             f"({host} x{profile.device_slowdown:g})")
    v.passed = not v.reasons
    return v


def accuracy_only_failure(v: VariantResult) -> bool:
    return bool(v.reasons) and all(r.startswith(FIDELITY_REASONS) for r in v.reasons)


def choose(results: list[VariantResult], profile: Profile) -> VariantResult | None:
    """The best passing variant by the profile's objective; ties go to the profile's precision
    preference, then to the runtime listed first."""
    ok = [r for r in results if r.passed]
    if not ok:
        return None
    base = lambda r: r.precision.split("-")[0] if r.precision.startswith("int8") else r.precision  # noqa: E731
    pref = {p: i for i, p in enumerate(profile.precisions)}
    order = {rt.name: i for i, rt in enumerate(profile.runtimes)}
    rank = lambda r: (pref.get(r.precision, pref.get(base(r), len(pref))), order.get(r.runtime, 0))  # noqa: E731
    if profile.objective == "size":
        best = min(ok, key=lambda r: (r.size_bytes, rank(r)))
    elif profile.objective == "latency" and all("p50_ms" in r.latency for r in ok):
        # within 5% of the fastest is a tie (measurement noise): then the profile's preference decides
        fastest = min(r.latency["p50_ms"] for r in ok)
        best = min((r for r in ok if r.latency["p50_ms"] <= fastest * 1.05),
                   key=lambda r: (rank(r), r.latency["p50_ms"]))
    else:
        best = min(ok, key=lambda r: (order.get(r.runtime, 0), rank(r), r.size_bytes))
    best.chosen = True
    return best


def fidelity(r: VariantResult) -> str:
    """The one number that says how close the variant is to the reference, as the table shows it."""
    m = r.metrics
    if m.get("reference") == "self":
        return "1 (self)"
    for key, fmt in (("accuracy", "acc {:.4f}"), ("top1_agreement", "agree {:.4f}"),
                     ("snr_db", "SNR {:.1f}"), ("int_agreement", "equal {:.4f}")):
        if key in m:
            return fmt.format(m[key])
    return "-"


def p95_text(lat: dict[str, Any]) -> str:
    """p95 with the spread of the runs when the gate measured again."""
    if "p95_ms" not in lat:
        return "-"
    runs = lat.get("p95_runs_ms")
    if not runs:
        return f"{lat['p95_ms']:.3f}"
    return f"{lat['p95_ms']:.3f} ({min(runs):.3f}-{max(runs):.3f}, {len(runs)} runs)"


def table(results: list[VariantResult], refused: list[tuple[str, str]] = ()) -> str:
    from toolkit.units import fmt_ms

    lines = [f"{'profile':<18} {'runtime':<14} {'variant':<15} {'size MB':>8} {'fidelity':>13} "
             f"{'p50':>9} {'p95 ms':>8}  result"]
    for r in results:
        p50 = r.latency.get("p50_ms")
        verdict = "CHOSEN" if r.chosen else "pass" if r.passed else "FAIL: " + "; ".join(r.reasons)
        if r.metrics.get("reference") == "self" and r.passed:
            verdict += " (the reference is this .tflite file itself: fidelity 1 by construction)"
        lines.append(f"{r.profile:<18} {r.runtime:<14} {r.precision:<15} {r.size_bytes / 1e6:>8.3f} "
                     f"{fidelity(r):>13} {fmt_ms(p50):>9} {p95_text(r.latency):>8}  "
                     f"{verdict}")
    for name, reason in refused:
        lines.append(f"{name:<18} {'-':<14} {'-':<15} {'-':>8} {'-':>13} {'-':>9} {'-':>8}  REFUSED: {reason}")
    return "\n".join(lines)
