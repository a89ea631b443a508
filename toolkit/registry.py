"""The embedded SQLite build registry: every build, its variants' metrics and its bundle."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from toolkit.errors import RegistryError

SCHEMA = """
CREATE TABLE IF NOT EXISTS builds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    profile TEXT NOT NULL,
    variant TEXT NOT NULL,
    format TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    bundle_path TEXT NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    metrics TEXT NOT NULL,
    UNIQUE (model, version, profile)
);
CREATE INDEX IF NOT EXISTS builds_model ON builds (model, version);
"""


class Registry:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise RegistryError(f"{self.path}: cannot open the registry ({exc})") from exc
        self.db.row_factory = sqlite3.Row

    def close(self) -> None:
        self.db.close()

    def next_version(self, model: str) -> int:
        row = self.db.execute("SELECT MAX(version) FROM builds WHERE model = ?", (model,)).fetchone()
        return int(row[0] or 0) + 1

    def record(self, *, model: str, version: int, profile: str, variant: str, fmt: str,
               size_bytes: int, bundle_path: str, bundle_sha256: str, metrics: dict[str, Any]) -> None:
        try:
            with self.db:
                self.db.execute(
                    "INSERT OR REPLACE INTO builds (created_at, model, version, profile, variant, format,"
                    " size_bytes, bundle_path, bundle_sha256, metrics) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (time.time(), model, version, profile, variant, fmt, size_bytes, bundle_path,
                     bundle_sha256, json.dumps(metrics, sort_keys=True, default=str)))
        except sqlite3.Error as exc:
            raise RegistryError(f"{self.path}: cannot record build ({exc})") from exc

    def models(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT model, MAX(version) AS latest, COUNT(*) AS builds, GROUP_CONCAT(DISTINCT profile) "
            "AS profiles, MAX(created_at) AS updated FROM builds GROUP BY model ORDER BY model")
        return [dict(r) for r in rows]

    def history(self, model: str) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM builds WHERE model = ? ORDER BY version DESC, profile",
                               (model,))
        out = []
        for r in rows:
            d = dict(r)
            d["metrics"] = json.loads(d["metrics"])
            out.append(d)
        return out
