"""What a set of telemetry records says, in one place for `fleet status`, the fleet report and rollout
verdicts: requests, errors, latency percentiles from the merged histograms (true percentiles of all the
requests, not a mean of per-record percentiles), drift, predicted-class and input distributions.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.fleet.telemetry import Histogram

SMOOTH = 0.5  # counts added to every bin before comparing two samples (an empty bin is not infinitely rare)


@dataclass
class Stats:
    records: int = 0
    requests: int = 0
    errors: int = 0
    dropped: int = 0
    latency: Histogram = field(default_factory=Histogram)
    drift_flag: bool = False  # any record of the set was flagged
    max_psi: float | None = None  # highest drift score of the set
    classes: dict[str, np.ndarray] = field(default_factory=dict)  # output -> predicted-class counts
    inputs: dict[tuple[str, tuple[float, ...]], np.ndarray] = field(default_factory=dict)  # (input, ref) -> counts
    confidence: dict[str, np.ndarray] = field(default_factory=dict)  # output -> top-1 probability histogram

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def p(self, q: float) -> float | None:
        return self.latency.percentile(q)

    def predictions(self) -> int:
        return int(max((c.sum() for c in self.classes.values()), default=0))

    def input_psi(self, min_samples: int = 200) -> float | None:
        """The highest PSI of an input's merged values against the reference its bundle carries."""
        scores = [sample_psi(np.asarray(ref) * counts.sum(), counts) for (_, ref), counts in self.inputs.items()
                  if counts.sum() >= min_samples]
        return max(scores) if scores else None

    def add(self, row: sqlite3.Row) -> None:
        """One stored record (its ``doc`` was checked by the protocol's parser when the collector stored it)."""
        self.records += 1
        self.requests += row["count"] or 0
        self.errors += row["errors"] or 0
        self.dropped = max(self.dropped, row["dropped"] or 0)
        if row["max_psi"] is not None:
            self.max_psi = max(self.max_psi or 0.0, row["max_psi"])
            self.drift_flag |= bool(row["drift_flag"])
        doc = json.loads(row["doc"]) if row["doc"] else {}
        self.latency.add_doc((doc.get("inference") or {}).get("hist"))
        drift = doc.get("drift") or {}
        for y in drift.get("outputs") or []:
            if y.get("counts"):
                _merge(self.classes, y["name"], y["counts"])
            if y.get("confidence"):
                _merge(self.confidence, y["name"], y["confidence"])
        for x in drift.get("inputs") or []:
            if x.get("counts") and x.get("ref_p"):
                _merge(self.inputs, (x["name"], tuple(x["ref_p"])), x["counts"])


def _merge(into: dict[Any, np.ndarray], key: Any, counts: list[int]) -> None:
    c = np.asarray(counts, np.float64)
    have = into.get(key)
    if have is None:
        into[key] = c
    elif len(have) == len(c):
        into[key] = have + c
    # else: another model's output of the same name with other classes: not comparable, ignored


def query(db: sqlite3.Connection, where: str, args: list[Any]) -> Stats:
    """Stats over the telemetry rows matching ``where``."""
    s = Stats()
    for row in db.execute("SELECT count, errors, dropped, max_psi, drift_flag, doc FROM telemetry "
                          f"WHERE {where}", args):
        s.add(row)
    return s


def sample_psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index between two count vectors over the same bins, each smoothed by SMOOTH."""
    e = (np.asarray(expected, np.float64) + SMOOTH)
    a = (np.asarray(actual, np.float64) + SMOOTH)
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def class_shift(wave: Stats, control: Stats, min_predictions: int) -> tuple[float | None, str]:
    """The largest PSI between the wave's and the control's predicted-class distributions (per output);
    None when either side made fewer than ``min_predictions`` predictions."""
    worst: float | None = None
    name = ""
    for out, c in wave.classes.items():
        ref = control.classes.get(out)
        if ref is None or len(ref) != len(c) or min(c.sum(), ref.sum()) < min_predictions:
            continue
        score = sample_psi(ref, c)
        if worst is None or score > worst:
            worst, name = score, out
    return worst, name



@dataclass
class Labels:
    """Field labels of a set of requests: how many samples were labelled and how many were predicted right."""

    samples: int = 0
    correct: int = 0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.samples if self.samples else None


def labels(db: sqlite3.Connection, where: str, args: list[Any]) -> Labels:
    """Labels over the rows of the ``labels`` table matching ``where``."""
    n, c = db.execute(f"SELECT COALESCE(SUM(n), 0), COALESCE(SUM(correct), 0) FROM labels WHERE {where}",
                      args).fetchone()
    return Labels(int(n), int(c))
