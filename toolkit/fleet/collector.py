"""`edgeship fleet collect`: telemetry and device state from the broker into SQLite (WAL).

paho's network thread only enqueues; one writer thread parses and inserts in batches (one
transaction per batch). Telemetry is keyed by (device, seq), so a record the device re-sent after
a reconnect is stored once. Several collectors can share the load through an MQTT shared
subscription (``$share/<name>/...``) on telemetry; every collector also follows the retained state
topics, which are idempotent upserts.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from agent.fleet.mqtt import Broker, connect_blocking, make_client
from agent.fleet.protocol import PREFIX
from toolkit.errors import ToolkitError

log = logging.getLogger(__name__)
PRUNE_EVERY_S = 600.0
MAX_REJECTED_ROWS = 10_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS telemetry (
    device TEXT NOT NULL, seq INTEGER NOT NULL, t REAL, received REAL, grp TEXT, model TEXT, version INTEGER,
    count INTEGER, errors INTEGER, p50_ms REAL, p95_ms REAL, p99_ms REAL, cpu_percent REAL, rss_bytes INTEGER,
    cpu_temp_c REAL, disk_free_bytes INTEGER, uptime_s REAL, drift_flag INTEGER, max_psi REAL, dropped INTEGER,
    doc TEXT, PRIMARY KEY (device, seq)
);
CREATE INDEX IF NOT EXISTS telemetry_t ON telemetry (t);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY, grp TEXT, online INTEGER, presence_t REAL, heartbeat_s REAL, model TEXT,
    version INTEGER, status TEXT, error TEXT, installed_sha256 TEXT, reported_t REAL, last_seen REAL
);
CREATE TABLE IF NOT EXISTS rejected (t REAL, topic TEXT, reason TEXT);
"""


def aggregate(db: sqlite3.Connection, where: str, args: list[Any]) -> tuple[int, int, float | None, int]:
    """Requests, errors, request-weighted p95 (ms) and the highest drop count over matching telemetry."""
    n, errs, p95, dropped = db.execute(
        "SELECT SUM(count), SUM(errors), SUM(p95_ms * count) / NULLIF(SUM(count), 0), MAX(dropped) "
        f"FROM telemetry WHERE {where}", args).fetchone()
    return int(n or 0), int(errs or 0), p95, int(dropped or 0)


def open_db(path: Path) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
    except (sqlite3.Error, OSError) as exc:
        raise ToolkitError(f"{path}: cannot open the fleet database ({exc})") from exc
    db.row_factory = sqlite3.Row
    return db


def _num(x: Any) -> float | None:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        x = float(x)
        return x if abs(x) < 1e18 else None  # also drops inf/nan-free giants SQLite cannot bind as integers
    return None


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) and abs(x) < 2**62 else None


def parse(topic: str, payload: bytes) -> tuple[str, tuple] | None:
    """A stored row for one message: ("telemetry" | "reported" | "presence", values). ValueError if malformed."""
    parts = topic.split("/")
    if len(parts) != 6 or parts[3] != "device":
        return None  # not ours (some brokers, e.g. amqtt, deliver more than the filters match)
    device, kind = parts[4], parts[5]
    if not payload:
        return None  # a cleared retained message
    if len(payload) > 256 * 1024:
        raise ValueError(f"{len(payload)} bytes is too large")
    doc = json.loads(payload)
    if not isinstance(doc, dict) or doc.get("v") != 1:
        raise ValueError("not an edgeship v1 message")
    now = time.time()
    if kind == "telemetry":
        inf, sysd, drift = doc.get("inference") or {}, doc.get("system") or {}, doc.get("drift") or {}
        seq = doc.get("seq")
        if (not isinstance(seq, int) or not 0 < seq < 2**62
                or not all(isinstance(x, dict) for x in (inf, sysd, drift))):
            raise ValueError("telemetry without seq or with malformed sections")
        return "telemetry", (device, doc["seq"], _num(doc.get("t")) or now, now, str(doc.get("group") or ""),
                             doc.get("model") if isinstance(doc.get("model"), str) else None,
                             _int(doc.get("version")),
                             int(_num(inf.get("count")) or 0), int(_num(inf.get("errors")) or 0),
                             _num(inf.get("p50_ms")), _num(inf.get("p95_ms")), _num(inf.get("p99_ms")),
                             _num(sysd.get("cpu_percent")), _num(sysd.get("rss_bytes")), _num(sysd.get("cpu_temp_c")),
                             _num(sysd.get("disk_free_bytes")), _num(sysd.get("uptime_s")),
                             int(bool(drift.get("flag"))), _num(drift.get("max_psi")),
                             int(_num(doc.get("dropped")) or 0), payload.decode())
    t = _num(doc.get("t")) or now
    seen = min(t, now)  # the device's clock, but never in the future (a retained message keeps its age)
    if kind == "presence":
        return "presence", (device, int(bool(doc.get("online"))), t, _num(doc.get("heartbeat_s")), seen)
    if kind == "reported":
        model, version, sha = doc.get("model"), doc.get("version"), doc.get("installed_sha256")
        return "reported", (device, str(doc.get("group") or ""), model if isinstance(model, str) else None,
                            _int(version), str(doc.get("status") or ""),
                            str(doc.get("error") or "")[:500], sha if isinstance(sha, str) else None, t, seen)
    return None


SQL = {
    "telemetry": "INSERT OR IGNORE INTO telemetry VALUES (" + ",".join("?" * 21) + ")",
    "presence": "INSERT INTO devices (device, online, presence_t, heartbeat_s, last_seen) VALUES (?,?,?,?,?) "
                "ON CONFLICT(device) DO UPDATE SET online=excluded.online, presence_t=excluded.presence_t, "
                "heartbeat_s=COALESCE(excluded.heartbeat_s, heartbeat_s), "
                "last_seen=MAX(COALESCE(last_seen, 0), excluded.last_seen)",
    "reported": "INSERT INTO devices (device, grp, model, version, status, error, installed_sha256, reported_t, "
                "last_seen) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(device) DO UPDATE SET grp=excluded.grp, "
                "model=excluded.model, version=excluded.version, status=excluded.status, error=excluded.error, "
                "installed_sha256=excluded.installed_sha256, reported_t=excluded.reported_t, "
                "last_seen=MAX(COALESCE(last_seen, 0), excluded.last_seen)",
}


class Collector:
    def __init__(self, broker: Broker, fleet: str, db_path: Path, share: str | None = None,
                 client_id: str | None = None, retention_days: float = 30.0):
        """With a ``client_id`` the session is persistent: the broker queues telemetry while the collector
        is down or reconnecting (give each collector process its own id). Telemetry older than
        ``retention_days`` is deleted as the collector runs."""
        self.broker, self.fleet, self.db_path, self.share = broker, fleet, db_path, share
        self.retention_s, self._pruned = retention_days * 86400, 0.0
        self.db = open_db(db_path)
        self.q: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self.received = self.stored = self.rejected = 0
        self.client = make_client(client_id or f"edgeship-collector-{time.time_ns()}", broker,
                                  clean_session=client_id is None)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._writer = threading.Thread(target=self._write, name="edgeship-collector", daemon=True)

    def start(self) -> "Collector":
        connect_blocking(self.client, self.broker)
        self._writer.start()
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.q.put(None)
        self._writer.join(30)
        self.db.close()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
        base = f"{PREFIX}/{self.fleet}/device/+"
        tele = f"{base}/telemetry"
        client.subscribe([(f"$share/{self.share}/{tele}" if self.share else tele, 1), (f"{base}/reported", 1),
                          (f"{base}/presence", 1)])

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.received += 1
        self.q.put((msg.topic, msg.payload))

    def _write(self) -> None:
        done = False
        while not done:
            batch = [self.q.get()]
            while len(batch) < 5000:
                try:
                    batch.append(self.q.get_nowait())
                except queue.Empty:
                    break
            done = None in batch
            rows: dict[str, list[tuple]] = {}
            for item in batch:
                if item is None:
                    continue
                topic, payload = item
                try:
                    row = parse(topic, payload)
                except (ValueError, TypeError, UnicodeDecodeError) as exc:
                    row = ("rejected", (time.time(), topic[:200], f"{type(exc).__name__}: {exc}"[:300]))
                if row is not None:
                    rows.setdefault(row[0], []).append(row[1])
            try:
                with self.db:
                    for kind, values in rows.items():
                        if kind == "rejected":
                            self.db.executemany("INSERT INTO rejected VALUES (?,?,?)", values)
                            log.warning("rejected %d malformed message(s), e.g. %s: %s", len(values), *values[0][1:])
                        else:
                            self.db.executemany(SQL[kind], values)
                self.stored += sum(len(v) for k, v in rows.items() if k != "rejected")
                self.rejected += len(rows.get("rejected", []))
            except (sqlite3.Error, OverflowError, ValueError):  # a value SQLite cannot bind: go one by one
                self._write_one_by_one(rows)
            if time.time() - self._pruned > PRUNE_EVERY_S:
                self.prune()

    def prune(self) -> None:
        """Drop telemetry past the retention period and all but the newest rejected-message notes."""
        self._pruned = time.time()
        try:
            with self.db:
                self.db.execute("DELETE FROM telemetry WHERE t < ?", (time.time() - self.retention_s,))
                self.db.execute("DELETE FROM rejected WHERE rowid <= (SELECT MAX(rowid) FROM rejected) - ?",
                                (MAX_REJECTED_ROWS,))
        except sqlite3.Error as exc:
            log.warning("pruning %s failed: %s", self.db_path, exc)

    def _write_one_by_one(self, rows: dict[str, list[tuple]]) -> None:
        for kind, values in rows.items():
            for v in values:
                try:
                    with self.db:
                        self.db.execute(SQL.get(kind, "INSERT INTO rejected VALUES (?,?,?)"), v)
                    self.stored += kind != "rejected"
                except (sqlite3.Error, OverflowError, ValueError) as exc:
                    self.rejected += 1
                    log.warning("could not store a %s message: %s", kind, exc)
