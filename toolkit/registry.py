"""The embedded SQLite build registry: every build, its variants' metrics and its bundle.

A version is registered when a bundle is written, not when a build starts: a build reserves its version
(atomically, across processes) just before it writes its first bundle, and records each bundle it wrote.
A failed build leaves no version behind; two concurrent builds never get the same version.
"""

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
CREATE TABLE IF NOT EXISTS reservations (
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    profile TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (model, version, profile)
);
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
        """The version a build would get now (registered or reserved, + 1); ``reserve`` takes it."""
        row = self.db.execute("SELECT MAX(v) FROM (SELECT version AS v FROM builds WHERE model = ? UNION ALL "
                              "SELECT version FROM reservations WHERE model = ?)", (model, model)).fetchone()
        return int(row[0] or 0) + 1

    def taken(self, model: str, version: int, profile: str) -> str | None:
        """Why ``model`` v``version`` for ``profile`` cannot be written (None: it can)."""
        row = self.db.execute("SELECT bundle_path FROM builds WHERE model = ? AND version = ? AND profile = ?",
                              (model, version, profile)).fetchone()
        if row:
            return f"{model} v{version} for {profile} is already registered ({row[0]})"
        row = self.db.execute("SELECT created_at FROM reservations WHERE model = ? AND version = ? AND profile = ?",
                              (model, version, profile)).fetchone()
        if row:
            return (f"{model} v{version} for {profile} is being written by another build (reserved "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(row[0]))})")
        return None

    def reserve(self, model: str, profile: str, version: int | None = None) -> int:
        """Reserve ``version`` (default: the next free one) of ``model`` for ``profile`` before its bundle
        is written. One write transaction: concurrent builds cannot take the same version."""
        try:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                v = version if version is not None else self.next_version(model)
                if why := self.taken(model, v, profile):
                    raise RegistryError(f"{self.path}: {why}; choose another --version or leave it out")
                self.db.execute("INSERT INTO reservations VALUES (?,?,?,?)", (model, v, profile, time.time()))
        except sqlite3.Error as exc:
            raise RegistryError(f"{self.path}: cannot reserve a version of {model} ({exc})") from exc
        return v

    def release(self, model: str, version: int, profile: str) -> None:
        """Give back a reservation whose bundle was not written."""
        try:
            with self.db:
                self.db.execute("DELETE FROM reservations WHERE model = ? AND version = ? AND profile = ?",
                                (model, version, profile))
        except sqlite3.Error as exc:
            raise RegistryError(f"{self.path}: cannot release {model} v{version} ({exc})") from exc

    def record(self, *, model: str, version: int, profile: str, variant: str, fmt: str,
               size_bytes: int, bundle_path: str, bundle_sha256: str, metrics: dict[str, Any]) -> None:
        """Register a written bundle (its reservation becomes the build row, in one transaction)."""
        try:
            with self.db:
                self.db.execute(
                    "INSERT INTO builds (created_at, model, version, profile, variant, format,"
                    " size_bytes, bundle_path, bundle_sha256, metrics) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (time.time(), model, version, profile, variant, fmt, size_bytes, bundle_path,
                     bundle_sha256, json.dumps(metrics, sort_keys=True, default=str)))
                self.db.execute("DELETE FROM reservations WHERE model = ? AND version = ? AND profile = ?",
                                (model, version, profile))
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
