"""The running agent: the active model, hot swap on commit, and inference metrics.

A request takes a reference to the current ``Loaded`` model and runs on it; a commit loads the new
model first and then swaps the reference, so in-flight requests finish on the old model, new ones go
to the new model, and no request fails during an update. Each loaded version runs on a small pool of
interpreters (``interpreters``, default: one per core) and keeps its live sequences (stateful models).
An answer with NaN/Inf in an output is withheld: the request fails and is counted as an error.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from agent.bundle import Limits
from agent.errors import AgentError, InputError, NonFiniteOutputError, NotReadyError
from agent.install import Device, Engine, Result
from agent.keys import Keyring
from agent.manifest import Manifest, parse_manifest
from agent.runtime import Model, load_model
from agent.serve.runner import Runner
from agent.serve.sequences import Sequence
from agent.store import Store
from agent.fleet.telemetry import Drift, Window

log = logging.getLogger(__name__)
BUCKETS_MS = (0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


@dataclass(frozen=True)
class Loaded:
    slot: str
    manifest: Manifest
    model: Model  # the pool's first instance (metadata: inputs, outputs, runtime)
    runner: Runner
    window: Window  # this version's requests since the last telemetry record
    drift: Drift


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.errors: dict[tuple[str, int], int] = {}
        self.hist: dict[tuple[str, int], list[int]] = {}
        self.sum_ms: dict[tuple[str, int], float] = {}
        self.fail_ms: dict[tuple[str, int], float] = {}
        self.last: dict[tuple[str, int], float] = {}  # when the last request ended (epoch seconds)

    def observe(self, key: tuple[str, int], ms: float, ok: bool) -> None:
        with self._lock:
            self.requests[key] = self.requests.get(key, 0) + 1
            self.last[key] = time.time()
            if not ok:
                self.errors[key] = self.errors.get(key, 0) + 1
                self.fail_ms[key] = self.fail_ms.get(key, 0.0) + ms
            h = self.hist.setdefault(key, [0] * (len(BUCKETS_MS) + 1))
            h[next((i for i, b in enumerate(BUCKETS_MS) if ms <= b), len(BUCKETS_MS))] += 1
            self.sum_ms[key] = self.sum_ms.get(key, 0.0) + ms

    def triton_stats(self, name: str, version: str | None = None) -> list[dict[str, Any]]:
        """Triton's statistics extension (``GET /v2/models[/{name}[/versions/{v}]]/stats``) from the same
        counters: per version, successes and failures with their total time. A request is one execution
        (the agent does not batch requests together)."""
        out = []
        with self._lock:
            for (m, v), n in sorted(self.requests.items()):
                if (name and m != name) or (version is not None and str(v) != version):
                    continue
                fails, fail_ms = self.errors.get((m, v), 0), self.fail_ms.get((m, v), 0.0)
                ok_ns = int((self.sum_ms[(m, v)] - fail_ms) * 1e6)
                zero = {"count": 0, "ns": 0}
                out.append({"name": m, "version": str(v), "last_inference": int(self.last[(m, v)] * 1000),
                            "inference_count": n - fails, "execution_count": n - fails,
                            "inference_stats": {"success": {"count": n - fails, "ns": ok_ns},
                                                "fail": {"count": fails, "ns": int(fail_ms * 1e6)},
                                                "queue": zero, "compute_input": zero,
                                                "compute_infer": {"count": n - fails, "ns": ok_ns},
                                                "compute_output": zero},
                            "batch_stats": []})
        return out

    def prometheus(self, active: Loaded | None) -> str:
        lines = ["# HELP edgeship_requests_total Inference requests.", "# TYPE edgeship_requests_total counter"]
        with self._lock:
            for (m, v), n in sorted(self.requests.items()):
                lines.append(f'edgeship_requests_total{{model="{m}",version="{v}"}} {n}')
            lines += ["# HELP edgeship_errors_total Failed inference requests.",
                      "# TYPE edgeship_errors_total counter"]
            for (m, v), n in sorted(self.errors.items()):
                lines.append(f'edgeship_errors_total{{model="{m}",version="{v}"}} {n}')
            lines += ["# HELP edgeship_latency_ms Inference latency.", "# TYPE edgeship_latency_ms histogram"]
            for (m, v), h in sorted(self.hist.items()):
                acc = 0
                for b, c in zip(list(BUCKETS_MS) + ["+Inf"], h):
                    acc += c
                    lines.append(f'edgeship_latency_ms_bucket{{model="{m}",version="{v}",le="{b}"}} {acc}')
                lines.append(f'edgeship_latency_ms_sum{{model="{m}",version="{v}"}} {self.sum_ms[(m, v)]:.3f}')
                lines.append(f'edgeship_latency_ms_count{{model="{m}",version="{v}"}} {acc}')
        lines += ["# HELP edgeship_active_model_version Version currently serving.",
                  "# TYPE edgeship_active_model_version gauge"]
        if active:
            lines.append(f'edgeship_active_model_version{{model="{active.manifest.name}"}} '
                         f'{active.manifest.version}')
        return "\n".join(lines) + "\n"


class Agent:
    """Python API of the device agent."""

    def __init__(self, state_dir: Path, keyring: Keyring, arch: str, threads: int | None = None,
                 faults: dict[str, str] | None = None, limits: Limits = Limits(), profile: str | None = None,
                 interpreters: int | None = None, max_sequences: int = 16, sequence_idle_timeout: float = 60.0,
                 opener: Any = None):
        """``keyring``: a Keyring or an agent.trust.Trust; ``opener``: the model key for sealed bundles."""
        self.store = Store(state_dir)
        self.threads = threads
        self.interpreters = interpreters or os.cpu_count() or 1
        self.max_sequences, self.sequence_idle_timeout = max_sequences, sequence_idle_timeout
        self.engine = Engine(self.store, keyring, Device(arch, threads, profile), on_commit=self._swap,
                             faults=faults, limits=limits, opener=opener)
        self.on_swap: list[Callable[[], None]] = []  # called after the served model changed (the link re-reports)
        self._installed: tuple[str, str | None] | None = None  # (served slot, its bundle's sha256), read on swap
        self.metrics = Metrics()
        self._current: Loaded | None = None
        self._install_lock = threading.Lock()
        self.drift_every = 0  # bin every Nth request's inputs for drift (0: off; telemetry turns it on)
        self._n = 0
        self.capture: Any = None  # agent.capture.recorder.Capture when [capture] is on

    def start(self) -> Result | None:
        """Recover an interrupted update, sweep what killed writes left behind, then load the active model.
        The caller owns the state dir (see agent.owner)."""
        res = self.engine.recover()
        self.store.sweep()
        active = self.store.load().get("active")
        if active and (self._current is None or self._current.slot != active):
            self._swap(active)
        return res

    @property
    def current(self) -> Loaded | None:
        return self._current

    def install(self, bundle: Path, allow_downgrade: bool = False, allow_model_change: bool = False) -> Result:
        with self._install_lock:
            return self.engine.install(Path(bundle), allow_downgrade, allow_model_change)

    def rollback(self) -> str:
        with self._install_lock:
            return self.engine.rollback()

    def predict(self, feed: Any, sequence: Sequence | None = None) -> dict[str, np.ndarray]:
        """Run ``feed`` on the current model; ``sequence`` selects a stateful model's sequence."""
        return self.infer(feed, sequence)[1]

    def infer(self, feed: Any, sequence: Sequence | None = None,
              request_id: str | None = None) -> tuple[Loaded, dict[str, np.ndarray]]:
        """Like ``predict``, and says which loaded version answered. ``request_id``: the id field labels
        refer to (with capture on)."""
        cur = self._current  # one reference for the whole request: a swap cannot affect it
        if cur is None:
            raise NotReadyError("no model installed; install a bundle first")
        key = (cur.manifest.name, cur.manifest.version)
        t = time.perf_counter()
        try:
            arrays, out = cur.runner.run(feed, sequence)
            _check_finite(cur, out)
        except InputError:
            raise  # the caller's input was refused (400): the model did not fail, nothing is counted
        except AgentError:
            ms = (time.perf_counter() - t) * 1e3
            self.metrics.observe(key, ms, False)
            cur.window.observe(ms, False)
            raise
        ms = (time.perf_counter() - t) * 1e3
        self.metrics.observe(key, ms, True)
        cur.window.observe(ms, True)
        if self.drift_every:
            self._n += 1
            if self._n % self.drift_every == 0:
                cur.drift.observe(arrays, out)
        if self.capture is not None:
            self.capture.offer(cur, arrays, out, request_id)
        return cur, out

    def installed_sha256(self) -> str | None:
        """SHA-256 of the bundle the served model came from (None: nothing served, or not recorded)."""
        cur, rec = self._current, self._installed
        return rec[1] if cur and rec and rec[0] == cur.slot else None

    def status(self) -> dict[str, Any]:
        """What this agent serves (not what the state file meant to do) and its update state."""
        doc = self.store.load()
        cur = self._current
        out = {"active": cur.slot if cur else None, "previous": doc.get("previous"),
               "model": cur.manifest.name if cur else None, "version": cur.manifest.version if cur else None,
               "installed_sha256": self.installed_sha256(),
               "update": doc.get("update"), "last_update": doc.get("last_update")}
        if hasattr(self.engine.keyring, "status"):  # a root-anchored keyring (agent.trust.Trust)
            out["keyring"] = self.engine.keyring.status()
        return out

    def _swap(self, slot: str | None, model: Model | None = None) -> None:
        """Point new requests at ``slot``; ``model`` is reused when the engine already loaded it."""
        if not slot:
            self._current = None
            self._swapped()
            return
        folder = self.store.slot(slot)
        m = parse_manifest((folder / "manifest.json").read_bytes())
        # Never serve the instance that replayed the golden set: a stateful model would start from the
        # state the replay left. A fresh instance of the same file is loaded instead.
        fresh = model.clone() if model is not None else load_model(folder / m.model_file,
                                                                   threads=self.threads or m.threads)
        runner = Runner(fresh, m, self.interpreters, self.max_sequences, self.sequence_idle_timeout)
        self._current = Loaded(slot, m, fresh, runner, Window(), Drift(m))
        log.info("serving %s (%s) from slot %s, up to %d interpreters%s", m.id, m.precision, slot,
                 self.interpreters, f", {runner.plan.kind} state" if runner.plan.stateful else "")
        self._swapped()

    def _swapped(self) -> None:
        cur = self._current
        try:  # read once per swap: what is reported must not depend on reading the state file again
            self._installed = (cur.slot, self.store.bundle_sha256(cur.slot)) if cur else None
        except AgentError as exc:
            log.error("cannot read which bundle slot %s came from: %s", cur.slot if cur else None, exc)
            self._installed = None
        for fn in self.on_swap:
            fn()


def _check_finite(cur: Loaded, out: dict[str, np.ndarray]) -> None:
    for name, a in out.items():
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            raise NonFiniteOutputError(f"{cur.manifest.id}: output {name!r} contains NaN/Inf for this input; "
                                       f"the answer is withheld")
