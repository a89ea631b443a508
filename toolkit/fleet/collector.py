"""`edgeship fleet collect`: telemetry, device state, captured predictions and field labels from the
broker into SQLite (WAL). Capture is folded in here rather than in a command of its own: one persistent
MQTT session per collector queues everything while it is down, one retention loop prunes it, and live
accuracy joins labels with the telemetry of the same versions in one database (toolkit/capture/store.py).

paho's network thread only enqueues; one writer thread parses and inserts in batches (one
transaction per batch). Telemetry is keyed by (device, seq), so a record the device re-sent after
a reconnect is stored once. Several collectors can share the load through an MQTT shared
subscription (``$share/<name>/...``) on telemetry; every collector also follows the retained state
topics, which are idempotent upserts.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from agent.errors import ProtocolError
from agent.fleet.mqtt import Broker, connect_blocking, make_client
from agent.fleet.protocol import PREFIX, parse_device_topic, parse_presence, parse_reported, parse_telemetry
from toolkit.capture import store as capture_store
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
TELEMETRY_COLUMNS = ("device", "seq", "t", "received", "grp", "model", "version", "count", "errors", "p50_ms",
                     "p95_ms", "p99_ms", "cpu_percent", "rss_bytes", "cpu_temp_c", "disk_free_bytes", "uptime_s",
                     "drift_flag", "max_psi", "dropped", "doc")


def open_db(path: Path, must_exist: bool = False) -> sqlite3.Connection:
    """The fleet database (created unless ``must_exist``: the commands that only read it refuse a typo)."""
    if must_exist and not path.is_file():
        raise ToolkitError(f"{path}: no fleet database there (`edgeship fleet collect` writes one; "
                           "check --db or --home)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        db.executescript(capture_store.SCHEMA)
    except (sqlite3.Error, OSError) as exc:
        raise ToolkitError(f"{path}: cannot open the fleet database ({exc})") from exc
    db.row_factory = sqlite3.Row
    return db


KINDS = ("telemetry", "reported", "presence", "capture", "label")


def parse_many(fleet: str, topic: str, payload: bytes, now: float | None = None) -> list[tuple[str, tuple]]:
    """The stored rows for one message (a capture message holds several records). ProtocolError if malformed."""
    where = parse_device_topic(fleet, topic, KINDS)
    if where is not None and where[1] in ("capture", "label") and payload:
        return capture_store.parse_rows(where[1], where[0], topic, payload, time.time() if now is None else now)
    row = parse(fleet, topic, payload, now)
    return [row] if row else []


def parse(fleet: str, topic: str, payload: bytes, now: float | None = None) -> tuple[str, tuple] | None:
    """A stored row for one message: ("telemetry" | "reported" | "presence", values); None for a topic that is
    not one of this fleet's device topics or a cleared retained message. ProtocolError if malformed."""
    where = parse_device_topic(fleet, topic, ("telemetry", "reported", "presence"))
    if where is None or not payload:
        return None  # not ours (amqtt delivers retained messages outside the filters), or cleared
    device, kind = where
    now = time.time() if now is None else now
    if kind == "telemetry":  # checked here, once: the histogram and drift counts are read from doc (stats.py)
        r = parse_telemetry(payload, topic, device)
        drift, sysd = r.drift or {}, r.system
        return "telemetry", (device, r.seq, r.t or now, now, r.group, r.model, r.version, r.count, r.errors,
                             r.p50_ms, r.p95_ms, r.p99_ms, sysd["cpu_percent"], sysd["rss_bytes"],
                             sysd["cpu_temp_c"], sysd["disk_free_bytes"], sysd["uptime_s"],
                             int(bool(drift.get("flag"))), drift.get("max_psi"), r.dropped, payload.decode())
    if kind == "presence":
        p = parse_presence(payload, topic)
        t = p.t or now
        return "presence", (device, int(p.online), t, p.heartbeat_s, min(t, now))
    rep = parse_reported(payload, topic, device)
    t = rep.t or now
    seen = min(t, now)  # the device's clock, but never in the future (a retained message keeps its age)
    return "reported", (device, rep.group, rep.model, rep.version, rep.status, rep.error[:500], rep.installed_sha256,
                        t, seen)


SQL = {
    "telemetry": f"INSERT OR IGNORE INTO telemetry ({', '.join(TELEMETRY_COLUMNS)}) "
                 f"VALUES ({','.join('?' * len(TELEMETRY_COLUMNS))})",
    "presence": "INSERT INTO devices (device, online, presence_t, heartbeat_s, last_seen) VALUES (?,?,?,?,?) "
                "ON CONFLICT(device) DO UPDATE SET online=excluded.online, presence_t=excluded.presence_t, "
                "heartbeat_s=COALESCE(excluded.heartbeat_s, heartbeat_s), "
                "last_seen=MAX(COALESCE(last_seen, 0), excluded.last_seen)",
    "reported": "INSERT INTO devices (device, grp, model, version, status, error, installed_sha256, reported_t, "
                "last_seen) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(device) DO UPDATE SET grp=excluded.grp, "
                "model=excluded.model, version=excluded.version, status=excluded.status, error=excluded.error, "
                "installed_sha256=excluded.installed_sha256, reported_t=excluded.reported_t, "
                "last_seen=MAX(COALESCE(last_seen, 0), excluded.last_seen)",
    **capture_store.SQL,
}


class Collector:
    def __init__(self, broker: Broker, fleet: str, db_path: Path, share: str | None = None,
                 client_id: str | None = None, retention_days: float = 30.0, capture_retention_days: float = 30.0):
        """With a ``client_id`` the session is persistent: the broker queues telemetry while the collector
        is down or reconnecting (give each collector process its own id). Telemetry older than
        ``retention_days``, captured predictions and labels older than ``capture_retention_days`` are deleted
        as the collector runs."""
        self.broker, self.fleet, self.db_path, self.share = broker, fleet, db_path, share
        self.retention_s, self._pruned = retention_days * 86400, 0.0
        self.capture_retention_s = capture_retention_days * 86400
        self.db = open_db(db_path)
        self.q: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self.received = self.stored = self.rejected = 0
        self.client = make_client(client_id or f"edgeship-collector-{time.time_ns()}", broker,
                                  clean_session=client_id is None)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.subscribed = threading.Event()  # the broker acknowledged the subscriptions (SUBACK)
        self._writer = threading.Thread(target=self._write, name="edgeship-collector", daemon=True)

    def start(self, timeout: float = 15.0) -> "Collector":
        """Connect and return once the broker acknowledged the subscriptions: every message published from
        then on is collected."""
        try:
            connect_blocking(self.client, self.broker)
        except Exception:
            self.db.close()
            raise
        self._writer.start()
        if not self.subscribed.wait(timeout):
            self.stop()
            raise ToolkitError(f"broker {self.broker.host}:{self.broker.port} did not acknowledge the collector's "
                               f"subscriptions within {timeout:g} s")
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
        shared = [tele, f"{base}/capture", f"{base}/label"]
        client.subscribe([*((f"$share/{self.share}/{t}" if self.share else t, 1) for t in shared),
                          (f"{base}/reported", 1), (f"{base}/presence", 1)])

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
                    found = parse_many(self.fleet, topic, payload)
                except ProtocolError as exc:
                    found = [("rejected", (time.time(), topic[:200], f"{type(exc).__name__}: {exc}"[:300]))]
                except Exception as exc:  # a parser bug must not stop the collector: the message is kept as rejected
                    log.exception("unexpected error parsing a message on %s", topic[:200])
                    found = [("rejected", (time.time(), topic[:200], f"unexpected {type(exc).__name__}: {exc}"[:300]))]
                for kind, values in found:
                    rows.setdefault(kind, []).append(values)
            try:
                with self.db:
                    for kind, values in rows.items():
                        if kind == "rejected":
                            self.db.executemany("INSERT INTO rejected VALUES (?,?,?)", values)
                            log.warning("rejected %d malformed message(s), e.g. %s: %s", len(values), *values[0][1:])
                        else:
                            self.db.executemany(SQL[kind], values)
                    if "capture_part" in rows:
                        bad = capture_store.join_parts(self.db)
                        if bad:
                            self.db.executemany("INSERT INTO rejected VALUES (?,?,?)",
                                                [(time.time(), w[:200], r[:300]) for w, r in bad])
                            self.rejected += len(bad)
                self.stored += sum(len(v) for k, v in rows.items() if k != "rejected" and not k.endswith("_counts"))
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
                capture_store.prune(self.db, self.capture_retention_s)
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
