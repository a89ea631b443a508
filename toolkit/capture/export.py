"""`edgeship capture export`: captured requests → an ``.npz`` that `edgeship build` takes as
``--calibration``, ``--validation`` or ``--train`` (toolkit/build/data.py), in the sample layout of
agent/layout.py: one array per model input (axis 0 counts samples), labels ``y`` where field labels
cover every exported sample, and the export's provenance (devices, versions, time range, reasons,
counts) as JSON bytes under PROVENANCE_KEY, which the build copies into its summary and signed manifest.
"""

from __future__ import annotations

import io
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.fleet.capture_wire import decode_record
from agent.store import atomic_write
from toolkit.errors import ToolkitError

PROVENANCE_KEY = "__edgeship_capture__"


def select(db: sqlite3.Connection, model: str | None = None, version: int | None = None, reason: str | None = None,
           device: str | None = None, since: float | None = None, until: float | None = None) -> list[sqlite3.Row]:
    where, args = ["1"], []
    for col, val in (("model", model), ("version", version), ("device", device)):
        if val is not None:
            where.append(f"c.{col} = ?")
            args.append(val)
    if reason:
        where.append("(',' || c.reasons || ',') LIKE ?")
        args.append(f"%,{reason},%")
    if since is not None:
        where.append("c.t >= ?")
        args.append(since)
    if until is not None:
        where.append("c.t < ?")
        args.append(until)
    return db.execute("SELECT c.*, l.labels AS labels FROM captures c LEFT JOIN labels l ON l.device = c.device "
                      f"AND l.id = c.id WHERE {' AND '.join(where)} ORDER BY c.t, c.device, c.seq", args).fetchall()


def export(db: sqlite3.Connection, out: Path, labelled: bool = False, **filters: Any) -> dict[str, Any]:
    """Write the selected records to ``out``; returns the provenance written with them."""
    rows = select(db, **filters)
    if labelled:
        rows = [r for r in rows if r["labels"]]
    if not rows:
        raise ToolkitError("no captured records match" + (f" ({_said(filters, labelled)})" if _said(filters, labelled)
                                                          else "") + "; see `edgeship capture list`")
    models = sorted({r["model"] for r in rows})
    if len(models) > 1:
        raise ToolkitError(f"the selection holds records of several models ({', '.join(models)}); pick one with "
                           "--model")
    inputs: dict[str, list[np.ndarray]] = {}
    labels: list[np.ndarray] = []
    shapes: dict[str, tuple[tuple[int, ...], str, int]] = {}
    for r in rows:
        rec = decode_record(bytes(r["blob"]), f"capture {r['device']}/{r['seq']}")
        if inputs and set(rec.inputs) != set(inputs):
            raise ToolkitError(f"v{r['version']} of {r['model']} has inputs {sorted(rec.inputs)}, other records "
                               f"{sorted(inputs)}: export one version at a time (--version)")
        for name, a in rec.inputs.items():
            sig = (a.shape[1:], a.dtype.str, r["version"])
            have = shapes.setdefault(name, sig)
            if have[:2] != sig[:2]:
                raise ToolkitError(f"input {name!r}: v{have[2]} captured samples of shape {have[0]} {have[1]}, "
                                   f"v{sig[2]} of shape {sig[0]} {sig[1]}: export one version at a time (--version)")
            inputs.setdefault(name, []).append(a)
        if r["labels"]:
            labels.append(np.asarray(json.loads(r["labels"]), np.int64))
    arrays = {name: np.concatenate(parts) for name, parts in inputs.items()}
    n = next(iter(arrays.values())).shape[0]
    have_y = len(labels) == len(rows) and sum(len(y) for y in labels) == n
    if have_y:
        arrays["y"] = np.concatenate(labels)
    reasons: dict[str, int] = {}
    for r in rows:
        for why in (r["reasons"] or "").split(","):
            if why:
                reasons[why] = reasons.get(why, 0) + 1
    prov = {"kind": "edgeship-capture", "model": models[0], "devices": sorted({r["device"] for r in rows}),
            "versions": sorted({r["version"] for r in rows}), "reasons": reasons, "records": len(rows),
            "samples": int(n), "labelled_records": sum(1 for r in rows if r["labels"]), "labels": have_y,
            "time_range": [min(r["t"] for r in rows), max(r["t"] for r in rows)],
            "filters": {k: v for k, v in {**filters, "labelled": labelled}.items() if v not in (None, False)},
            "exported": time.time()}
    arrays[PROVENANCE_KEY] = np.frombuffer(json.dumps(prov, sort_keys=True).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write(out, buf.getvalue())
    return prov


def _said(filters: dict[str, Any], labelled: bool) -> str:
    parts = [f"{k} {v}" for k, v in filters.items() if v is not None]
    return ", ".join(parts + (["labelled only"] if labelled else []))


def read_provenance(arrays: dict[str, np.ndarray], where: str) -> dict[str, Any] | None:
    """The capture provenance an exported npz carries (None: not an export)."""
    raw = arrays.get(PROVENANCE_KEY)
    if raw is None:
        return None
    try:
        doc = json.loads(raw.astype(np.uint8).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ToolkitError(f"{where}: {PROVENANCE_KEY} is not the JSON an export writes ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("kind") != "edgeship-capture":
        raise ToolkitError(f"{where}: {PROVENANCE_KEY} is not an edgeship capture provenance")
    return doc
