"""Store-and-forward queue for telemetry: records go to SQLite before they are sent, leave it only
once the broker acknowledged them (QoS 1), and are sent in order after a reconnect.

The queue is bounded: when full, the oldest records are dropped and counted; every sent record
carries its sequence number and the device's running drop count, so the host knows exactly what
it lost. Records are stored as JSON objects and handed back as objects: the sender builds the
message (protocol.telemetry_payload), nothing here splices bytes.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class Outbox:
    def __init__(self, path: Path, max_records: int = 10_000):
        self.max_records = max(1, max_records)
        self._lock = threading.Lock()
        self.db = sqlite3.connect(str(path), timeout=30, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process crash
        self.db.executescript(SCHEMA)

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
        payload = json.dumps(record, separators=(",", ":"), allow_nan=False).encode()
        with self._lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            seq = self.db.execute("INSERT INTO outbox (topic, payload) VALUES (?, ?)", (topic, payload)).lastrowid
            n = self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            if n > self.max_records:
                over = n - self.max_records
                self.db.execute("DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)",
                                (over,))
                self.db.execute("INSERT INTO meta VALUES ('dropped', ?) ON CONFLICT(key) DO UPDATE SET "
                                "value = value + excluded.value", (over,))
            return int(seq)

    def peek(self, limit: int = 100) -> tuple[list[tuple[int, str, dict[str, Any]]], int]:
        """The oldest records as (seq, topic, record), and the number of records dropped so far. A row that
        is not a JSON object (a damaged file) is skipped and deleted with a log line."""
        with self._lock:
            rows = self.db.execute("SELECT seq, topic, payload FROM outbox ORDER BY seq LIMIT ?", (limit,)).fetchall()
            row = self.db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
        out, bad = [], []
        for seq, topic, payload in rows:
            try:
                record = json.loads(bytes(payload))
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
        return out, int(row[0]) if row else 0

    def ack(self, upto: int) -> None:
        """Forget every record up to and including ``upto`` (the broker has them)."""
        with self._lock, self.db:
            self.db.execute("DELETE FROM outbox WHERE seq <= ?", (upto,))
