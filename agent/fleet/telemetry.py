"""What the device reports every interval: inference counts and latency percentiles (from a log-bucket
histogram), input/output drift against the bundle's calibration statistics, and system health.

Everything here is cheap on the request path: a bucket increment, and for drift a strided sample of
the input values binned against the manifest's reference bins.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.manifest import Manifest

_GROWTH = 1.08  # bucket width: percentiles are exact to within 8%
_MIN_MS = 0.001
_INV_LOG_GROWTH = 1 / math.log(_GROWTH)
_NBUCKETS = int(math.log(1e6 / _MIN_MS) * _INV_LOG_GROWTH) + 2  # 1 µs .. 1000 s
PSI_EPS = 1e-4
PSI_THRESHOLD = 0.25  # PSI above this is a significant shift (the usual rule of thumb)
DRIFT_SAMPLE = 1024  # input values looked at per request (strided)
DRIFT_MIN_ROWS = 50  # requests' worth of data before a drift score is reported
SUM_TOLERANCE = 0.05  # rows of probabilities sum to 1 within this (an int8 softmax output is off by ~1%)
CONF_BINS = 10  # confidence histogram of a classifier output: top-1 probability in tenths


@functools.lru_cache(maxsize=4096)
def bucket_edge(growth: float, min_ms: float, i: int) -> float:
    """Upper edge (ms) of bucket ``i``: bucket 0 holds <= min_ms, bucket i (min_ms*g^(i-1), min_ms*g^i]."""
    return float(f"{min_ms * growth ** i:.6g}")


class Histogram:
    """Log-bucket latency histograms merged (from one window or many records, of one device or many):
    percentiles of the merged counts are percentiles of all the requests, unlike a mean of percentiles.
    Records with other bucket parameters merge too (each bucket counts at its upper edge)."""

    def __init__(self) -> None:
        self._raw: dict[tuple[float, float], dict[Any, int]] = {}  # (growth, min_ms) -> {bucket: count}
        self.count = 0

    def add(self, growth: float, min_ms: float, counts: dict[Any, int]) -> "Histogram":
        """``counts``: {bucket number (int or its decimal string): requests}."""
        mine = self._raw.setdefault((growth, min_ms), {})
        for k, c in counts.items():
            mine[k] = mine.get(k, 0) + c
        self.count += sum(counts.values())
        return self

    def add_doc(self, hist: dict[str, Any] | None) -> "Histogram":
        """A record's ``inference.hist`` ({growth, min_ms, counts}); None adds nothing."""
        return self.add(hist["growth"], hist["min_ms"], hist["counts"]) if hist else self

    def percentile(self, q: float) -> float | None:
        """The upper edge of the bucket holding the q-th percentile request (within one bucket width)."""
        if not self.count:
            return None
        by_edge: dict[float, int] = {}
        for (g, m), counts in self._raw.items():
            for k, c in counts.items():
                e = bucket_edge(g, m, int(k))
                by_edge[e] = by_edge.get(e, 0) + c
        need, acc = max(1, math.ceil(self.count * q / 100)), 0
        for edge in sorted(by_edge):
            acc += by_edge[edge]
            if acc >= need:
                return edge
        return max(by_edge)


class Window:
    """Inference count, errors and a latency histogram since the last snapshot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.count = self.errors = 0
        self.buckets = [0] * _NBUCKETS  # a list: incrementing it is cheaper than a numpy array

    def observe(self, ms: float, ok: bool) -> None:
        i = 0 if ms <= _MIN_MS else min(_NBUCKETS - 1, int(math.log(ms / _MIN_MS) * _INV_LOG_GROWTH) + 1)
        with self._lock:
            self.count += 1
            self.errors += not ok
            self.buckets[i] += 1

    def snapshot(self) -> dict[str, Any]:
        """count, errors, p50/p95/p99 and the histogram itself, sparse ({bucket: count}), so that the host
        can merge records and compute true percentiles over any set of them."""
        with self._lock:
            count, errors, b = self.count, self.errors, self.buckets
            self._reset()
        counts = {i: c for i, c in enumerate(b) if c}
        h = Histogram().add(_GROWTH, _MIN_MS, counts)
        out: dict[str, Any] = {"count": count, "errors": errors}
        for q in (50, 95, 99):
            out[f"p{q}_ms"] = h.percentile(q)
        out["hist"] = {"growth": _GROWTH, "min_ms": _MIN_MS, "counts": {str(i): c for i, c in counts.items()}}
        return out


def top1(y: np.ndarray) -> np.ndarray:
    """The top-1 probability of each row of a classifier output (rows that are not probabilities — negative
    values, or not summing to 1 — are logits: softmax first)."""
    p = y.astype(np.float64, copy=False)
    if p.min() < 0 or p.max() > 1 or np.abs(p.sum(1) - 1).max() > SUM_TOLERANCE:
        e = np.exp(p - p.max(1, keepdims=True))
        return (e / e.sum(1, keepdims=True)).max(1)
    return p.max(1)


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index between two distributions over the same bins."""
    e = np.clip(expected, PSI_EPS, None)
    a = np.clip(actual, PSI_EPS, None)
    return float(np.sum((a - e) * np.log(a / e)))


class Drift:
    """Input and predicted-class distributions of the active model vs the bundle's reference statistics."""

    def __init__(self, manifest: Manifest):
        self._lock = threading.Lock()
        data = manifest.data
        self.inputs: list[tuple[str, np.ndarray, np.ndarray, float, float] | None] = []
        by_name = {s.get("name"): s for s in data.get("input_stats") or [] if isinstance(s, dict)}
        for spec in manifest.inputs:
            st = by_name.get(spec.name) or {}
            bins = st.get("bins") or {}
            try:
                edges, p = np.asarray(bins["edges"], np.float64), np.asarray(bins["p"], np.float64)
                ok = len(p) == len(edges) + 1
            except (KeyError, TypeError, ValueError):
                ok = False
            self.inputs.append((spec.name, edges, p, float(st.get("mean", 0)), float(st.get("std", 0)) or 1.0)
                               if ok else None)
        outs = {s.get("name"): s for s in data.get("output_stats") or [] if isinstance(s, dict)}
        self.outputs = [(spec.name, np.asarray(outs[spec.name]["p"], np.float64)) for spec in manifest.outputs
                        if spec.name in outs and isinstance(outs[spec.name].get("p"), list)]
        self._reset()

    def _reset(self) -> None:
        self.rows = 0
        self.in_counts = [np.zeros(len(x[2])) if x else None for x in self.inputs]
        self.in_sum = [0.0] * len(self.inputs)
        self.in_n = [0] * len(self.inputs)
        self.out_counts = [np.zeros(len(p)) for _, p in self.outputs]
        self.out_conf = [np.zeros(CONF_BINS) for _ in self.outputs]

    @property
    def enabled(self) -> bool:
        return any(self.inputs) or bool(self.outputs)

    def observe(self, arrays: list[np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        with self._lock:
            self.rows += arrays[0].shape[0] if arrays and arrays[0].ndim else 1
            for k, (ref, a) in enumerate(zip(self.inputs, arrays)):
                if ref is None:
                    continue
                flat = a.reshape(-1)
                if flat.size > DRIFT_SAMPLE:
                    flat = flat[:: flat.size // DRIFT_SAMPLE]
                self.in_counts[k] += np.bincount(np.searchsorted(ref[1], flat, side="left"),
                                                 minlength=len(ref[2]))
                self.in_sum[k] += float(flat.sum())
                self.in_n[k] += flat.size
            for k, (name, p) in enumerate(self.outputs):
                y = outputs.get(name)
                if y is not None and y.ndim == 2 and y.shape[1] == len(p):
                    self.out_counts[k] += np.bincount(y.argmax(1), minlength=len(p))
                    self.out_conf[k] += np.bincount(np.minimum((top1(y) * CONF_BINS).astype(np.intp),
                                                               CONF_BINS - 1), minlength=CONF_BINS)

    def snapshot(self, threshold: float = PSI_THRESHOLD) -> dict[str, Any] | None:
        """Scores once enough requests were seen (then start a new window); None before that."""
        with self._lock:
            if not self.enabled or self.rows < DRIFT_MIN_ROWS:
                return None
            ins = []
            for ref, counts, s, n in zip(self.inputs, self.in_counts, self.in_sum, self.in_n):
                if ref is None or n == 0:
                    continue
                ins.append({"name": ref[0], "psi": round(psi(ref[2], counts / n), 4),
                            "mean_shift_std": round(abs(s / n - ref[3]) / ref[4], 3),
                            "counts": [int(x) for x in counts], "ref_p": [float(x) for x in ref[2]]})
            outs = [{"name": name, "psi": round(psi(p, c / c.sum()), 4), "p": [round(x, 4) for x in c / c.sum()],
                     "counts": [int(x) for x in c], "confidence": [int(x) for x in conf]}
                    for (name, p), c, conf in zip(self.outputs, self.out_counts, self.out_conf) if c.sum()]
            rows = self.rows
            self._reset()
        worst = max([x["psi"] for x in ins + outs] or [0.0])
        return {"rows": rows, "inputs": ins, "outputs": outs, "max_psi": worst, "flag": worst > threshold,
                "threshold": threshold}


class System:
    """Process CPU %, RSS, CPU temperature, free disk and uptime."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.started = time.time()
        self._last = (time.monotonic(), _cpu_seconds())

    def snapshot(self) -> dict[str, Any]:
        now, cpu = time.monotonic(), _cpu_seconds()
        (t0, c0), self._last = self._last, (now, cpu)
        return {"cpu_percent": round(100 * (cpu - c0) / max(now - t0, 1e-6), 1), "rss_bytes": _rss(),
                "cpu_temp_c": cpu_temperature(), "disk_free_bytes": shutil.disk_usage(self.state_dir).free,
                "uptime_s": round(time.time() - self.started, 1)}


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def cpu_temperature(root: Path = Path("/sys/class/thermal")) -> float | None:
    """The hottest thermal zone in °C (Raspberry Pi: cpu-thermal), or None when the board has none."""
    temps = []
    for zone in root.glob("thermal_zone*/temp"):
        try:
            temps.append(int(zone.read_text().strip()) / 1000)
        except (OSError, ValueError):
            continue
    return max(temps) if temps else None
