"""Stateful and streaming models: each live sequence has its own state, starting fresh.

A model keeps state in one of two ways:

- ``runtime``: inside the interpreter (TFLite resource variables, found by their ops). A sequence gets
  its own interpreter instance, created fresh when the sequence starts; the instance that ran the
  golden-set replay is never served.
- ``io``: as tensors the manifest declares, ``"state": [{"input": "h_in", "output": "h_out"}]``
  (Triton's implicit state). The agent keeps each sequence's state tensors, feeds them as the declared
  inputs (zeros at the start) and keeps the declared outputs for the next request; clients neither send
  nor receive them.

Sequences follow Triton's sequence batcher: ``sequence_id`` (a non-zero integer or a non-empty string),
``sequence_start`` (begin with fresh state, replacing a live sequence of the same id) and
``sequence_end`` (drop the state after this request). At most ``max_live`` sequences are live; one
idle longer than ``idle_timeout`` seconds has ended. A request without a sequence id on a stateful
model is a sequence of one request: fresh state, discarded afterwards.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from agent.errors import CapacityError, ManifestError, SequenceError
from agent.manifest import Manifest, TensorSpec
from agent.runtime import Model

MAX_SEQUENCE_ID_CHARS = 256


@dataclass(frozen=True)
class Sequence:
    """The sequence parameters of one request."""

    id: int | str
    start: bool = False
    end: bool = False

    @classmethod
    def parse(cls, params: dict[str, Any]) -> "Sequence | None":
        """From v2 request ``parameters``; None when the request is not part of a sequence."""
        sid = params.get("sequence_id", 0)
        if isinstance(sid, bool) or not isinstance(sid, (int, str)):
            raise SequenceError(f"parameters.sequence_id: expected an integer or a string, got {sid!r}")
        if isinstance(sid, int) and not 0 <= sid < 2 ** 64:
            raise SequenceError(f"parameters.sequence_id: {sid} is not an unsigned 64-bit integer")
        if isinstance(sid, str) and len(sid) > MAX_SEQUENCE_ID_CHARS:
            raise SequenceError(f"parameters.sequence_id: longer than {MAX_SEQUENCE_ID_CHARS} characters")
        flags = {}
        for k in ("sequence_start", "sequence_end"):
            v = params.get(k, False)
            if not isinstance(v, bool):
                raise SequenceError(f"parameters.{k}: expected true or false, got {v!r}")
            flags[k] = v
        if sid in (0, ""):
            if flags["sequence_start"] or flags["sequence_end"]:
                raise SequenceError("parameters: sequence_start/sequence_end need a non-zero sequence_id")
            return None
        return cls(sid, flags["sequence_start"], flags["sequence_end"])


@dataclass(frozen=True)
class StatePlan:
    kind: str  # "none" | "runtime" | "io"
    pairs: tuple[tuple[TensorSpec, TensorSpec], ...] = ()  # (input, output) for "io"

    @property
    def stateful(self) -> bool:
        return self.kind != "none"

    def visible(self, model: Model) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """The inputs and outputs clients see (declared state tensors are the agent's business)."""
        ins = {i.name for i, _ in self.pairs}
        outs = {o.name for _, o in self.pairs}
        return (tuple(s for s in model.inputs if s.name not in ins),
                tuple(s for s in model.outputs if s.name not in outs))

    def initial(self) -> dict[str, np.ndarray]:
        return {i.name: np.zeros([1 if d < 0 else d for d in i.shape], np.dtype(i.dtype)) for i, _ in self.pairs}


def state_plan(model: Model, manifest: Manifest) -> StatePlan:
    declared = manifest.data.get("state") or []
    where = f"{manifest.id}: manifest.json.state"
    if not isinstance(declared, list):
        raise ManifestError(f"{where}: expected a list of {{\"input\", \"output\"}} pairs")
    ins = {s.name: s for s in model.inputs}
    outs = {s.name: s for s in model.outputs}
    pairs = []
    for k, d in enumerate(declared):
        if not isinstance(d, dict) or d.get("input") not in ins or d.get("output") not in outs:
            raise ManifestError(f"{where}[{k}]: needs \"input\" and \"output\" naming a model input and output "
                                f"(inputs {list(ins)}, outputs {list(outs)})")
        i, o = ins[d["input"]], outs[d["output"]]
        if i.dtype != o.dtype or len(i.shape) != len(o.shape):
            raise ManifestError(f"{where}[{k}]: {i.name} ({i.dtype}, {list(i.shape)}) and {o.name} "
                                f"({o.dtype}, {list(o.shape)}) must have the same type and rank")
        pairs.append((i, o))
    if pairs:
        return StatePlan("io", tuple(pairs))
    return StatePlan("runtime") if model.stateful else StatePlan("none")


@dataclass
class _Session:
    model: Model | None  # own interpreter ("runtime")
    tensors: dict[str, np.ndarray]  # state tensors ("io")
    last: float
    lock: threading.Lock = field(default_factory=threading.Lock)


class Sequences:
    """The live sequences of one loaded model version."""

    def __init__(self, plan: StatePlan, fresh_model: Callable[[], Model], max_live: int, idle_timeout: float,
                 clock: Callable[[], float] = time.monotonic):
        self.plan, self.max_live, self.idle_timeout = plan, max_live, idle_timeout
        self._fresh_model, self._clock = fresh_model, clock
        self._live: dict[int | str, _Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._sweep()
            return len(self._live)

    def session(self, seq: Sequence | None) -> _Session:
        """The session a request runs in: a throw-away one without a sequence id."""
        if seq is None:
            with self._lock:
                self._sweep()  # expired sequences free their interpreters on any request
            return self._new()
        if seq.start:
            with self._lock:
                self._live.pop(seq.id, None)
                self._check_room()
            fresh = self._new()  # may load an interpreter: outside the lock
            with self._lock:
                self._live.pop(seq.id, None)
                self._check_room()
                self._live[seq.id] = fresh
            return fresh
        with self._lock:
            self._sweep()
            s = self._live.get(seq.id)
            if s is None:
                raise SequenceError(f"sequence {seq.id!r} is not live (never started, ended, idle for more than "
                                    f"{self.idle_timeout:g} s, or started before a model update); "
                                    f"send sequence_start=true to begin it")
            s.last = self._clock()
            return s

    def finish(self, seq: Sequence | None) -> None:
        if seq is not None and seq.end:
            with self._lock:
                self._live.pop(seq.id, None)

    def _check_room(self) -> None:
        self._sweep()
        if len(self._live) >= self.max_live:
            raise CapacityError(f"too many live sequences ({self.max_live}, [agent] max_sequences); end one with "
                            f"sequence_end or wait {self.idle_timeout:g} s for idle ones to expire")

    def _new(self) -> _Session:
        model = self._fresh_model() if self.plan.kind == "runtime" else None
        return _Session(model, self.plan.initial(), self._clock())

    def _sweep(self) -> None:
        now = self._clock()
        for sid in [k for k, s in self._live.items() if now - s.last > self.idle_timeout]:
            del self._live[sid]
