"""Store-and-forward queue for telemetry, field labels and captured predictions: records go to SQLite
before they are sent, leave it only once the broker acknowledged them (QoS 1), and are sent in order
after a reconnect.

The queue is bounded (records, and optionally bytes): when full, the oldest records are dropped and
counted; every sent record carries its sequence number and the device's running drop count, so the
host knows exactly what it lost. Telemetry and labels are stored as JSON objects and handed back as
objects (the sender builds the message, e.g. protocol.telemetry_payload); captured predictions are
stored as the bytes capture_wire.encode_record made (``put_raw`` / ``peek_raw``).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class Outbox:
    def __init__(self, path: Path, max_records: int = 10_000, max_bytes: int = 0):
        """``max_bytes`` (0: no byte bound) bounds the payload bytes queued as well."""
        self.max_records, self.max_bytes = max(1, max_records), max(0, max_bytes)
        self._lock = threading.Lock()
        try:
            self.db = self._open(path)
        except sqlite3.DatabaseError as exc:  # a damaged queue must not keep the agent from serving
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            log.error("%s is damaged (%s): moved to %s, starting an empty queue", path, exc, aside.name)
            for suffix in ("", "-wal", "-shm"):
                p = Path(f"{path}{suffix}")
                if p.exists():
                    p.rename(Path(f"{aside}{suffix}"))
            self.db = self._open(path)

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(str(path), timeout=30, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process crash
            db.executescript(SCHEMA)
            db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def close(self) -> None:
        with self._lock:
            self.db.close()

    @property
    def dropped(self) -> int:
        with self._lock:
            row = self.db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
        return int(row[0]) if row else 0

    def __len__(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def put(self, topic: str, record: dict[str, Any]) -> int:
        """Queue a record; returns its sequence number. Drops the oldest beyond the bound."""
        return self.put_raw(topic, json.dumps(record, separators=(",", ":"), allow_nan=False).encode())

    def put_raw(self, topic: str, payload: bytes, meta: dict[str, int] | None = None) -> int:
        """Queue bytes; returns their sequence number. Drops the oldest beyond the bounds (a payload larger
        than the byte bound alone is dropped itself: it is counted, and 0 is returned). ``meta``: counters
        set in the same transaction (e.g. the capture budget spent so far)."""
        if self.max_bytes and len(payload) > self.max_bytes:
            self.add("dropped", 1)
            return 0
        with self._lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if meta:
                self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(meta.items()))
            seq = self.db.execute("INSERT INTO outbox (topic, payload) VALUES (?, ?)", (topic, payload)).lastrowid
            n = self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            over = max(0, n - self.max_records)
            if self.max_bytes:
                self._add("bytes", len(payload))
                size = self._get("bytes")
                if size > self.max_bytes:  # the fewest oldest records that bring it back under the bound
                    acc, k = 0, 0
                    for (length,) in self.db.execute("SELECT LENGTH(payload) FROM outbox ORDER BY seq"):
                        if size - acc <= self.max_bytes and k >= over:
                            break
                        acc, k = acc + length, k + 1
                    over = k
            if over:
                if self.max_bytes:
                    gone = self.db.execute("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM (SELECT payload FROM "
                                           "outbox ORDER BY seq LIMIT ?)", (over,)).fetchone()[0]
                    self._add("bytes", -gone)
                self.db.execute("DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)",
                                (over,))
                self._add("dropped", over)
            return int(seq)

    def _get(self, key: str) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _add(self, key: str, n: int) -> None:
        self.db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
                        (key, n))

    def get(self, key: str) -> int:
        """A counter kept with the queue (it survives restarts like the records): dropped, bytes, ..."""
        with self._lock:
            return self._get(key)

    def add(self, key: str, n: int) -> None:
        with self._lock, self.db:
            self._add(key, n)

    def set(self, key: str, value: int) -> None:
        with self._lock, self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def peek_raw(self, limit: int = 100) -> tuple[list[tuple[int, str, bytes]], int]:
        """The oldest records as (seq, topic, bytes), and the number of records dropped so far."""
        with self._lock:
            rows = self.db.execute("SELECT seq, topic, payload FROM outbox ORDER BY seq LIMIT ?", (limit,)).fetchall()
            dropped = self._get("dropped")
        return [(int(s), t, bytes(p)) for s, t, p in rows], dropped

    def peek(self, limit: int = 100) -> tuple[list[tuple[int, str, dict[str, Any]]], int]:
        """The oldest records as (seq, topic, record), and the number of records dropped so far. A row that
        is not a JSON object (a damaged file) is skipped and deleted with a log line."""
        rows, dropped = self.peek_raw(limit)
        out, bad = [], []
        for seq, topic, payload in rows:
            try:
                record = json.loads(payload)
            except ValueError:
                record = None
            if isinstance(record, dict):
                out.append((int(seq), topic, record))
            else:
                bad.append(seq)
        if bad:
            log.warning("telemetry queue: %d unreadable record(s) deleted (seq %s)", len(bad), bad[:5])
            with self._lock, self.db:
                self.db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in bad])
        return out, dropped

    def ack(self, upto: int) -> None:
        """Forget every record up to and including ``upto`` (the broker has them)."""
        with self._lock, self.db:
            if self.max_bytes:
                gone = self.db.execute("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM outbox WHERE seq <= ?",
                                       (upto,)).fetchone()[0]
                self._add("bytes", -gone)
            self.db.execute("DELETE FROM outbox WHERE seq <= ?", (upto,))


def publish_acked(client: Any, messages: list[tuple[int, str, bytes]], timeout: float = 10.0) -> int | None:
    """Publish ``messages`` [(seq, topic, payload)] in order at QoS 1 and wait for the broker's
    acknowledgements; returns the seq of the last message acknowledged without a gap (None: none was)."""
    infos = [(seq, client.publish(topic, payload, qos=1)) for seq, topic, payload in messages]
    acked = None
    for seq, info in infos:
        try:
            info.wait_for_publish(timeout)
        except RuntimeError:  # not queued: the connection went away
            break
        if not info.is_published():
            break
        acked = seq
    return acked
