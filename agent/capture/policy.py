"""Which requests to capture: the sampling decision, made inline on the request thread (a few
microseconds; nothing is copied or written here).

Policies (any that fires adds its reason to the record):

- ``rate``: a fixed fraction of requests, chosen at random (reason ``rate``);
- ``low_confidence``: the top-1 probability of the classifier output is below the threshold, or the
  margin between the two best classes is below ``margin`` (``low-confidence``). Classifier output: the
  first 2-D float output with 2..1000 columns; rows that are not probabilities (negative values, or not
  summing to 1 within 5%) are read as logits and go through a softmax first;
- ``drift_psi``: the request's input values, binned on the bundle's reference bins (``input_stats``),
  are further than this PSI from the reference, or a value lies outside the reference's range (``drift``);
- everything, until a time the host asked for (``requested``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from agent.fleet.telemetry import DRIFT_SAMPLE, SUM_TOLERANCE, psi
from agent.manifest import Manifest

REASONS = ("rate", "low-confidence", "drift", "requested")


@dataclass(frozen=True)
class CaptureConfig:
    """The ``[capture]`` section of agent.toml (docs/agent.md, Prediction capture). Off by default."""

    enabled: bool = False
    rate: float = 0.0  # fraction of requests captured at random (0.01 = 1%)
    low_confidence: float = 0.0  # capture when the top-1 probability is below this (0: off)
    margin: float = 0.0  # capture when top-1 minus top-2 probability is below this (0: off)
    drift_psi: float = 0.0  # capture when a request's inputs are this far (PSI) from the reference (0: off)
    budget_bytes: int = 10 << 20  # bytes of captured records queued per day (UTC); beyond: not captured
    queue_max: int = 1000  # captured records kept on disk while they cannot be sent; oldest dropped first
    queue_bytes: int = 64 << 20  # and at most this many bytes of them
    labels_max: int = 10_000  # field labels kept on disk while they cannot be sent
    recent: int = 10_000  # recent requests remembered for feedback (request id -> prediction)

    @property
    def sampling(self) -> bool:
        return self.rate > 0 or self.low_confidence > 0 or self.margin > 0 or self.drift_psi > 0


class Confidence(NamedTuple):  # (a tuple: made for every request, cheaper than a dataclass)
    """The first classifier output of an answer: per row, the top-1 class and the two best probabilities."""

    output: str
    classes: int
    top: tuple[int, ...]  # (tuples of numbers: the garbage collector stops tracking them)
    p1: tuple[float, ...]
    p2: tuple[float, ...]


def confidence(out: dict[str, np.ndarray], names: list[str]) -> Confidence | None:
    """The first classifier output in ``names`` order (None when the model has none). One small row (the
    usual request) is read in plain Python: a handful of numpy calls would cost more than the model."""
    for name in names:
        y = out.get(name)
        if y is None or y.ndim != 2 or y.dtype.kind != "f" or not 2 <= y.shape[1] <= 1000:
            continue
        if y.shape[0] == 1 and y.shape[1] <= 64:
            row = y[0].tolist()
            if min(row) < 0 or max(row) > 1 or abs(sum(row) - 1) > SUM_TOLERANCE:  # logits: softmax
                m = max(row)
                e = [math.exp(v - m) for v in row]
                total = sum(e)
                row = [v / total for v in e]
            best = sorted(row)[-2:]
            return Confidence(name, y.shape[1], (row.index(best[1]),), (best[1],), (best[0],))
        p = y.astype(np.float64, copy=False)
        if p.min() < 0 or p.max() > 1 or np.abs(p.sum(1) - 1).max() > SUM_TOLERANCE:  # logits: softmax
            e = np.exp(p - p.max(1, keepdims=True))
            p = e / e.sum(1, keepdims=True)
        two = -np.partition(-p, 1, axis=1)[:, :2]
        return Confidence(name, y.shape[1], tuple(np.argmax(p, 1).tolist()), tuple(two[:, 0].tolist()),
                          tuple(two[:, 1].tolist()))
    return None


class Decider:
    """The policies for one loaded model version."""

    def __init__(self, cfg: CaptureConfig, manifest: Manifest):
        self.cfg = cfg
        self.outputs = [s.name for s in manifest.outputs]
        by_name = {s.get("name"): s for s in manifest.data.get("input_stats") or [] if isinstance(s, dict)}
        self.refs: list[tuple[np.ndarray, np.ndarray, float, float] | None] = []
        for spec in manifest.inputs:
            bins = (by_name.get(spec.name) or {}).get("bins") or {}
            dec = (by_name.get(spec.name) or {}).get("deciles") or []
            try:
                edges, p = np.asarray(bins["edges"], np.float64), np.asarray(bins["p"], np.float64)
                ok = len(p) == len(edges) + 1 and len(dec) >= 2
            except (KeyError, TypeError, ValueError):
                ok = False
            self.refs.append((edges, p, float(dec[0]), float(dec[-1])) if ok else None)
        self._rand = random.random

    def reasons(self, arrays: list[np.ndarray], conf: Confidence | None, everything: bool) -> list[str]:
        cfg, why = self.cfg, []
        if cfg.rate > 0 and self._rand() < cfg.rate:
            why.append("rate")
        if conf is not None and (cfg.low_confidence > 0 or cfg.margin > 0):
            if (cfg.low_confidence > 0 and min(conf.p1) < cfg.low_confidence) or (
                    cfg.margin > 0 and min(a - b for a, b in zip(conf.p1, conf.p2)) < cfg.margin):
                why.append("low-confidence")
        if cfg.drift_psi > 0 and self.drift(arrays) > cfg.drift_psi:
            why.append("drift")
        if everything:
            why.append("requested")
        return why

    def drift(self, arrays: list[np.ndarray]) -> float:
        """The request's largest per-input PSI against the reference bins (inf when a value lies outside
        the reference range seen at build time); 0 when the bundle has no reference."""
        worst = 0.0
        for ref, a in zip(self.refs, arrays):
            if ref is None:
                continue
            edges, p, lo, hi = ref
            flat = a.reshape(-1)
            if flat.size > DRIFT_SAMPLE:
                flat = flat[:: flat.size // DRIFT_SAMPLE]
            if flat.size == 0:
                continue
            if flat.min() < lo or flat.max() > hi:
                return float("inf")
            counts = np.bincount(np.searchsorted(edges, flat, side="left"), minlength=len(p))
            worst = max(worst, psi(p, counts / flat.size))
        return worst


def describe(cfg: CaptureConfig) -> dict[str, Any]:
    """The policy as reported (agent status, logs)."""
    return {k: getattr(cfg, k) for k in ("enabled", "rate", "low_confidence", "margin", "drift_psi",
                                         "budget_bytes", "queue_max", "queue_bytes")}
