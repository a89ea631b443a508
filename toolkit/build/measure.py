"""Accuracy against the fp32 reference, and latency/RSS through the isolated latency worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class LatencyConfig:
    """benchmark_model defaults; tests may shorten them (they assert behaviour, not speed)."""

    warmup_runs: int = 1
    warmup_seconds: float = 0.5
    runs: int = 50
    seconds: float = 1.0
    enabled: bool = True
    gate: bool = True  # tests turn the latency budget off: they assert behaviour, not speed
    remeasure: int = 2  # extra runs before a latency-budget failure refuses a variant


def compare(outputs: list[np.ndarray], reference: list[np.ndarray],
            labels: np.ndarray | None) -> dict[str, Any]:
    """Metrics of a variant's outputs vs the reference, over every output.

    Float outputs: max |error| and SNR (the worst output counts). Integer and bool outputs (class ids,
    token ids, masks) are compared exactly: ``int_agreement`` is the smallest fraction of equal values.
    The first float output decides the task: ``[N, C]`` is a classifier (top-1 agreement, accuracy
    with labels); anything else is regression (SNR).
    """
    m: dict[str, Any] = {}
    finite = all(bool(np.isfinite(o).all()) for o in outputs if o.dtype.kind == "f")
    m["finite"] = finite
    errs, snrs, agree = [], [], []
    for o, r in zip(outputs, reference):
        o = o.reshape(r.shape)
        if r.dtype.kind in "iub":
            agree.append(float(np.mean(o == r)) if r.size else 1.0)
            continue
        if not finite:
            errs.append(float("inf"))
            snrs.append(-99.0)
            continue
        o, r = o.astype(np.float64), r.astype(np.float64)
        errs.append(float(np.max(np.abs(o - r))) if r.size else 0.0)
        noise, signal = float(np.mean((o - r) ** 2)), float(np.mean(r ** 2))
        snrs.append(99.0 if noise == 0 else float(10 * np.log10(max(signal, 1e-30) / noise)))
    if agree:
        m["int_agreement"] = min(agree)
    if not snrs:
        m["task"] = "integer"
        return m
    m["max_abs_error"] = max(errs)
    m["snr_db"] = float(min(snrs))
    k = next(i for i, r in enumerate(reference) if r.dtype.kind == "f")
    out, ref = outputs[k].reshape(reference[k].shape), reference[k]
    classification = ref.ndim == 2 and ref.shape[1] > 1
    m["task"] = "classification" if classification else "regression"
    if classification:
        pred, rpred = out.argmax(1), ref.argmax(1)
        m["top1_agreement"] = float(np.mean(pred == rpred))
        m["classes"] = int(ref.shape[1])
        if labels is not None:
            m["reference_accuracy"] = float(np.mean(rpred == labels))
            m["accuracy"] = float(np.mean(pred == labels))
            m["accuracy_drop_points"] = 100.0 * (m["reference_accuracy"] - m["accuracy"])
    return m


def latency_stats(times_ms: list[float]) -> dict[str, float]:
    """Percentiles of one benchmark run's per-inference times."""
    p = np.percentile(times_ms, [50, 90, 95, 99])
    return {"runs": len(times_ms), "p50_ms": float(p[0]), "p90_ms": float(p[1]), "p95_ms": float(p[2]),
            "p99_ms": float(p[3]), "mean_ms": float(np.mean(times_ms))}


def run_worker(model_path: Path, threads: int, inputs_npz: Path | None, cfg: LatencyConfig,
               python: str | None = None, prefer: str | None = None, check_only: bool = False,
               timeout: float = 600, eval_inputs: Path | None = None,
               eval_out: Path | None = None) -> dict[str, Any]:
    """Load and time ``model_path`` in a fresh process (own RSS; optionally another Python/runtime)."""
    model_path = Path(model_path).resolve()  # the worker runs in the repository folder
    inputs_npz = Path(inputs_npz).resolve() if inputs_npz else None
    cmd = [python or sys.executable, "-m", "toolkit.build.latency_worker", str(model_path),
           "--threads", str(threads), "--warmup-runs", str(cfg.warmup_runs),
           "--warmup-seconds", str(cfg.warmup_seconds), "--runs", str(cfg.runs),
           "--seconds", str(cfg.seconds)]
    if inputs_npz:
        cmd += ["--inputs", str(inputs_npz)]
    if prefer:
        cmd += ["--prefer", prefer]
    if eval_inputs and eval_out:
        cmd += ["--eval", str(Path(eval_inputs).resolve()), "--eval-out", str(Path(eval_out).resolve())]
    if check_only or not cfg.enabled:
        cmd.append("--check-only")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip() and not ln.startswith(" ")]
        how = f"crashed (signal {-proc.returncode})" if proc.returncode < 0 else f"exited {proc.returncode}"
        return {"ok": False, "error": f"runtime process {how}: {(tail or ['no output'])[-1]}"}
    res = json.loads(lines[-1])
    if res.get("error"):  # runtimes put newlines in their messages; a reason is one line
        res["error"] = " ".join(str(res["error"]).split())
    if "times_ms" in res:
        res.update(latency_stats(res.pop("times_ms")))
    return res
