"""Which inputs of a streaming model are its state: the pairs (input, output) the device keeps per sequence.

A bundle declares them in its manifest (``"state": [{"input": "state", "output": "stateN"}]``, see
docs/bundle.md); the agent then keeps each sequence's state itself (Triton's implicit state, with
``sequence_id`` / ``sequence_start`` / ``sequence_end``), and a client may still carry the state itself by
sending the state inputs. Pairs come from ``--state IN=OUT``, from ``"state"`` in ``--meta``, or, when
neither says, are found by name: an output named like its input plus a next-state marker
(``stateN``, ``h_out``, ``next_cache_0``, ``hn`` for ``h0`` …) with the same dtype and shape.
"""

from __future__ import annotations

from typing import Any, Iterable

from toolkit.build.ingest import IOSpec
from toolkit.errors import InputError


def _successors(name: str) -> set[str]:
    """The names a model exporter gives the next value of state input ``name``."""
    out = {name + s for s in ("N", "n", "_out", "out", "_next", "_new", ".out")}
    out |= {p + name for p in ("next_", "new_", "out_")}
    for a, b in (("_in", "_out"), ("in", "out"), ("_prev", "_next"), ("0", "n"), ("_0", "_n")):
        if name.endswith(a):
            out.add(name[: -len(a)] + b)
    for a, b in (("in_", "out_"), ("past_", "present_"), ("prev_", "next_")):
        if name.startswith(a):
            out.add(b + name[len(a):])
    return out - {name}


def _same_tensor(i: IOSpec, o: IOSpec) -> bool:
    return i.dtype == o.dtype and len(i.shape) == len(o.shape) and all(
        a == b or -1 in (a, b) for a, b in zip(i.shape, o.shape))


def detect(inputs: Iterable[IOSpec], outputs: Iterable[IOSpec]) -> list[tuple[str, str]]:
    """State pairs found by name, dtype and shape; an input matching several outputs is not guessed."""
    outs = {o.name: o for o in outputs}
    pairs, used = [], set()
    for i in inputs:
        found = [n for n in _successors(i.name) if n in outs and n not in used and _same_tensor(i, outs[n])]
        if len(found) == 1:
            pairs.append((i.name, found[0]))
            used.add(found[0])
    return pairs


def parse(values: Iterable[str]) -> list[tuple[str, str]]:
    """``IN=OUT`` options."""
    pairs = []
    for v in values:
        i, sep, o = v.partition("=")
        if not sep or not i or not o:
            raise InputError(f"--state {v!r}: expected INPUT=OUTPUT (a state input and the output that holds its "
                             f"next value)")
        pairs.append((i, o))
    return pairs


def from_meta(meta: dict[str, Any]) -> list[tuple[str, str]] | None:
    """``"state": [{"input": ..., "output": ...}]`` from --meta; None when the metadata does not say."""
    if "state" not in meta:
        return None
    doc = meta["state"]
    if not isinstance(doc, list) or not all(isinstance(d, dict) and isinstance(d.get("input"), str)
                                           and isinstance(d.get("output"), str) for d in doc):
        raise InputError('--meta: "state" must be a list of {"input": NAME, "output": NAME}')
    return [(d["input"], d["output"]) for d in doc]


def check(pairs: list[tuple[str, str]], inputs: list[IOSpec], outputs: list[IOSpec]) -> list[tuple[str, str]]:
    """Refuse pairs that do not name a model input and output of the same dtype and rank."""
    ins, outs = {s.name: s for s in inputs}, {s.name: s for s in outputs}
    for i, o in pairs:
        if i not in ins or o not in outs:
            raise InputError(f"state {i}={o}: needs a model input and output (inputs {list(ins)}, "
                             f"outputs {list(outs)})")
        if not _same_tensor(ins[i], outs[o]):
            raise InputError(f"state {i}={o}: {i} ({ins[i].dtype}, {list(ins[i].shape)}) and {o} "
                             f"({outs[o].dtype}, {list(outs[o].shape)}) must have the same dtype and shape")
    if len({i for i, _ in pairs}) != len(pairs) or len({o for _, o in pairs}) != len(pairs):
        raise InputError(f"state {pairs}: an input or output is named twice")
    return pairs
