"""Captured predictions and field labels in the fleet database (written by `edgeship fleet collect`).

Tables (beside telemetry, in the same SQLite file):

- ``captures``: one row per captured request, keyed by (device, seq) so a record the device re-sent is
  stored once; its metadata in columns and the record blob exactly as the device sent it;
- ``capture_parts``: pieces of records too big for one message, until all of them arrived;
- ``labels``: one row per labelled request, keyed by (device, request id): a later label corrects it;
- ``capture_devices``: per device, the drop counts the devices sent (queue overflow, over budget, labels).

Each record is decoded once when it arrives (a malformed one goes to ``rejected``), so what is stored
can be exported without surprises.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from agent.errors import ProtocolError
from agent.fleet.capture_wire import Message, decode_record, parse_capture
from agent.fleet.protocol import parse_label

SCHEMA = """
CREATE TABLE IF NOT EXISTS captures (
    device TEXT NOT NULL, seq INTEGER NOT NULL, id TEXT, t REAL, received REAL, model TEXT, version INTEGER,
    reasons TEXT, layout TEXT, rows INTEGER, size INTEGER, raw_bytes INTEGER, blob BLOB, PRIMARY KEY (device, seq)
);
CREATE INDEX IF NOT EXISTS captures_t ON captures (t);
CREATE INDEX IF NOT EXISTS captures_id ON captures (device, id);
CREATE TABLE IF NOT EXISTS capture_parts (
    device TEXT NOT NULL, seq INTEGER NOT NULL, idx INTEGER NOT NULL, count INTEGER, size INTEGER, received REAL,
    piece BLOB, PRIMARY KEY (device, seq, idx)
);
CREATE TABLE IF NOT EXISTS labels (
    device TEXT NOT NULL, id TEXT NOT NULL, seq INTEGER, t REAL, received REAL, model TEXT, version INTEGER,
    labels TEXT, predicted TEXT, confidence TEXT, n INTEGER, correct INTEGER, captured INTEGER,
    PRIMARY KEY (device, id)
);
CREATE INDEX IF NOT EXISTS labels_received ON labels (received);
CREATE TABLE IF NOT EXISTS capture_devices (
    device TEXT PRIMARY KEY, dropped INTEGER DEFAULT 0, over_budget INTEGER DEFAULT 0,
    labels_dropped INTEGER DEFAULT 0, updated REAL
);
"""
PART_TTL_S = 86400.0  # parts of a record that never completed are forgotten after a day

SQL = {
    "capture": "INSERT OR IGNORE INTO captures (device, seq, id, t, received, model, version, reasons, layout, rows, "
               "size, raw_bytes, blob) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
    "capture_part": "INSERT OR IGNORE INTO capture_parts VALUES (?,?,?,?,?,?,?)",
    "capture_counts": "INSERT INTO capture_devices (device, dropped, over_budget, updated) VALUES (?,?,?,?) "
                      "ON CONFLICT(device) DO UPDATE SET dropped=MAX(dropped, excluded.dropped), "
                      "over_budget=MAX(over_budget, excluded.over_budget), updated=excluded.updated",
    "label": "INSERT OR REPLACE INTO labels VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
    "label_counts": "INSERT INTO capture_devices (device, labels_dropped, updated) VALUES (?,?,?) "
                    "ON CONFLICT(device) DO UPDATE SET labels_dropped=MAX(labels_dropped, excluded.labels_dropped), "
                    "updated=excluded.updated",
}


def record_row(device: str, seq: int, blob: bytes, now: float, where: str) -> tuple:
    r = decode_record(blob, where)
    first = next(iter(r.inputs.values()), None)
    rows = int(first.shape[0]) if first is not None and first.ndim and r.layout == "batch" else 1
    raw = sum(a.nbytes for a in [*r.inputs.values(), *r.outputs.values()])
    return (device, seq, r.id, r.t, now, r.model, r.version, ",".join(r.reasons), r.layout, rows, len(blob), raw, blob)


def parse_rows(kind: str, device: str, topic: str, payload: bytes, now: float) -> list[tuple[str, tuple]]:
    """Rows to store for a ``capture`` or ``label`` message; ProtocolError when it is malformed."""
    if kind == "label":
        lb = parse_label(payload, topic, device)
        correct = sum(a == b for a, b in zip(lb.labels, lb.predicted))
        return [("label", (device, lb.id, lb.seq, lb.t, now, lb.model, lb.version, json.dumps(lb.labels),
                           json.dumps(lb.predicted), json.dumps(lb.confidence), len(lb.labels), correct,
                           int(lb.captured))),
                ("label_counts", (device, lb.dropped, now))]
    m: Message = parse_capture(payload, topic, device)
    out = [("capture", record_row(device, seq, blob, now, f"{topic}: record {seq}")) for seq, blob in m.records]
    if m.part is not None:
        seq, idx, count, size, piece = m.part
        out.append(("capture_part", (device, seq, idx, count, size, now, piece)))
    out.append(("capture_counts", (device, m.dropped, m.over_budget, now)))
    return out


def join_parts(db: sqlite3.Connection, now: float | None = None) -> list[tuple[str, str]]:
    """Assemble every record whose parts all arrived into ``captures``; returns (topic-ish, reason) of
    the ones that did not decode (the caller records them as rejected)."""
    now = time.time() if now is None else now
    bad = []
    done = db.execute("SELECT device, seq, MAX(count), MAX(size) FROM capture_parts GROUP BY device, seq "
                      "HAVING COUNT(*) = MAX(count) AND MIN(count) = MAX(count)").fetchall()
    for device, seq, count, size in done:
        pieces = db.execute("SELECT piece FROM capture_parts WHERE device = ? AND seq = ? ORDER BY idx",
                            (device, seq)).fetchall()
        blob = b"".join(bytes(p[0]) for p in pieces)
        where = f"capture from {device}: record {seq}"
        try:
            if len(blob) != size:
                raise ProtocolError(f"{where}: parts add up to {len(blob)} bytes, not {size}")
            db.execute(SQL["capture"], record_row(device, seq, blob, now, where))
        except ProtocolError as exc:
            bad.append((where, f"ProtocolError: {exc}"))
        db.execute("DELETE FROM capture_parts WHERE device = ? AND seq = ?", (device, seq))
    db.execute("DELETE FROM capture_parts WHERE received < ?", (now - PART_TTL_S,))
    return bad


def prune(db: sqlite3.Connection, retention_s: float, now: float | None = None) -> None:
    """Forget captured records and labels older than the retention period (collector side)."""
    cut = (time.time() if now is None else now) - retention_s
    db.execute("DELETE FROM captures WHERE received < ?", (cut,))
    db.execute("DELETE FROM labels WHERE received < ?", (cut,))


def purge(db: sqlite3.Connection, before: float | None = None, device: str | None = None) -> dict[str, int]:
    """Delete captured records, their parts and labels (all, or before a time, or of one device)."""
    where, args = ["1"], []
    if before is not None:
        where.append("received < ?")
        args.append(before)
    if device is not None:
        where.append("device = ?")
        args.append(device)
    cond = " AND ".join(where)
    with db:
        n = {"captures": db.execute(f"DELETE FROM captures WHERE {cond}", args).rowcount,
             "labels": db.execute(f"DELETE FROM labels WHERE {cond}", args).rowcount,
             "parts": db.execute(f"DELETE FROM capture_parts WHERE {cond}", args).rowcount}
    db.execute("VACUUM")  # deleted rows must not linger in the file's free pages
    return n


def summary(db: sqlite3.Connection, device: str | None = None) -> list[dict[str, Any]]:
    """Per device, model version and reason: captured records, samples, bytes, labelled records, time range."""
    args: list[Any] = []
    cond = ""
    if device:
        cond, args = "WHERE c.device = ?", [device]
    rows = db.execute(
        "SELECT c.device, c.model, c.version, c.reasons, COUNT(*) AS records, SUM(c.rows) AS samples, "
        "SUM(c.size) AS bytes, SUM(c.raw_bytes) AS raw_bytes, MIN(c.t) AS first, MAX(c.t) AS last, "
        "SUM(l.id IS NOT NULL) AS labelled FROM captures c LEFT JOIN labels l ON l.device = c.device AND l.id = c.id "
        f"{cond} GROUP BY c.device, c.model, c.version, c.reasons ORDER BY c.device, c.model, c.version, c.reasons",
        args).fetchall()
    drops = {r["device"]: dict(r) for r in db.execute("SELECT * FROM capture_devices")}
    out = []
    for r in rows:
        d = dict(r)
        d.update({k: (drops.get(r["device"]) or {}).get(k, 0) for k in ("dropped", "over_budget")})
        out.append(d)
    return out
