"""Runs requests on one loaded model version: an interpreter pool and the live sequences."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from agent.errors import InputError
from agent.manifest import Manifest
from agent.runtime import Model
from agent.serve.pool import InterpreterPool
from agent.serve.sequences import Sequence, Sequences, state_plan


class Runner:
    """``model`` is a fresh instance (never the one that replayed the golden set): it becomes the first
    interpreter of the pool, or, for a model with runtime state, the template new sequences are loaded
    from."""

    def __init__(self, model: Model, manifest: Manifest, interpreters: int, max_sequences: int,
                 idle_timeout: float):
        self.plan = state_plan(model, manifest)
        self.inputs, self.outputs = self.plan.visible(model)  # what clients see (metadata)
        self.all_inputs, self.all_outputs = model.inputs, model.outputs  # what a client may still send
        self.pool = None if self.plan.kind == "runtime" else InterpreterPool(model, interpreters)
        self.sequences = Sequences(self.plan, model.clone, max_sequences, idle_timeout)
        self._state_out = {o.name: i.name for i, o in self.plan.pairs}

    def run(self, feed: Any, seq: Sequence | None) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        """Arranged inputs and the outputs clients see. One sample of a stacked-layout model given exactly as
        the model takes it (no leading sample axis) is answered in the model's own output shapes."""
        if self.pool is not None and (not self.plan.stateful or self._carries_state(feed, seq)):
            with self.pool.lease() as m:
                return _call(m, feed)
        session = self.sequences.session(seq)
        try:
            with session.lock:
                if session.model is not None:  # runtime state: the sequence's own interpreter
                    return _call(session.model, feed)
                assert self.pool is not None
                with self.pool.lease() as m:
                    arrays, out = _call(m, {**self._named(feed), **session.tensors})
                session.tensors = {self._state_out[k]: v for k, v in out.items() if k in self._state_out}
                return arrays, {k: v for k, v in out.items() if k not in self._state_out}
        finally:
            self.sequences.finish(seq)

    def _carries_state(self, feed: Any, seq: Sequence | None) -> bool:
        """A request that sends the declared state inputs itself (no sequence id) carries its own state:
        it runs as given and gets the state outputs back, as with a model that declares no state."""
        if self.plan.kind != "io" or not isinstance(feed, Mapping):
            return False
        names = [i.name for i, _ in self.plan.pairs]
        sent = [n for n in names if n in feed]
        if not sent:
            return False
        if seq is not None:
            raise InputError(f"inputs {sent} are the model's state: with a sequence_id the agent keeps it per "
                             f"sequence; send either the sequence id or the state, not both")
        if len(sent) != len(names):
            raise InputError(f"a request that carries the model's state must send all of it: "
                             f"{sorted(set(names) - set(sent))} missing")
        return True

    def _named(self, feed: Any) -> dict[str, Any]:
        if isinstance(feed, Mapping):
            return dict(feed)
        if isinstance(feed, np.ndarray) or not isinstance(feed, (list, tuple)):
            feed = [feed]
        if len(feed) != len(self.inputs):
            raise InputError(f"model takes {len(self.inputs)} inputs (besides its state), got {len(feed)}")
        return {s.name: x for s, x in zip(self.inputs, feed)}


def _call(m: Model, feed: Any) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    single = m.unstacked(feed)
    arrays = m.arrange(feed)
    out = m.run(arrays)
    return arrays, ({k: v[0] for k, v in out.items()} if single else out)
