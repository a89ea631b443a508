"""Staged rollouts: canary wave first, then the rest; halt and roll the wave back when devices fail.

Rollout state lives in the registry (SQLite), saved after every step, so `edgeship rollout
status/resume/abort` work after the host process restarts. Decisions use the devices' retained
reported state (install success, failure, golden-set refusal); telemetry-based halts (error rate,
p95 vs the replaced version) come with the telemetry issue.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

from agent.mqtt import Broker
from toolkit.errors import ToolkitError
from toolkit.fleet import devices
from toolkit.publish import Publisher

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL, updated REAL, fleet TEXT, grp TEXT, bundle TEXT,
    model TEXT, version INTEGER, sha256 TEXT, size INTEGER, state TEXT, plan TEXT, error TEXT
);
"""


class Rollouts:
    def __init__(self, db: Path, broker: Broker, fleet: str, pub_factory: Callable[[], Publisher],
                 wait: float = 1.0, echo: Callable[[str], None] = lambda m: None):
        self.db = sqlite3.connect(str(db), timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.executescript(SCHEMA)
        self.broker, self.fleet, self.pub_factory, self.wait, self.echo = broker, fleet, pub_factory, wait, echo

    def get(self, rid: int) -> dict[str, Any]:
        row = self.db.execute("SELECT * FROM rollouts WHERE id = ?", (rid,)).fetchone()
        if row is None:
            raise ToolkitError(f"no rollout {rid}")
        d = dict(row)
        d["plan"] = json.loads(d["plan"])
        return d

    def list(self) -> list[dict[str, Any]]:
        return [self.get(r[0]) for r in self.db.execute("SELECT id FROM rollouts ORDER BY id DESC")]

    def _save(self, r: dict[str, Any]) -> None:
        with self.db:
            self.db.execute("UPDATE rollouts SET updated=?, state=?, plan=?, error=? WHERE id=?",
                            (time.time(), r["state"], json.dumps(r["plan"]), r.get("error", ""), r["id"]))

    def start(self, bundle: Path, group: str, canary_pct: float, max_failures: int = 0,
              timeout: float = 300) -> dict[str, Any]:
        members = [d for d in devices(self.broker, self.fleet) if d.get("group") == group]
        if not members:
            raise ToolkitError(f"group {group!r} has no devices reporting in fleet {self.fleet!r}")
        names = [d["device"] for d in members]
        n_canary = max(1, math.ceil(len(names) * canary_pct / 100))
        waves = [names[:n_canary]] + ([names[n_canary:]] if names[n_canary:] else [])
        pub = self.pub_factory()
        try:
            info = pub.upload(bundle)
        finally:
            pub.close()
        plan = {"waves": waves, "wave": 0, "max_failures": max_failures, "timeout": timeout,
                "previous": {d["device"]: {"version": d.get("version"), "sha256": d.get("installed_sha256")}
                             for d in members}, "results": {}}
        with self.db:
            cur = self.db.execute(
                "INSERT INTO rollouts (created, updated, fleet, grp, bundle, model, version, sha256, size, state,"
                " plan, error) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (time.time(), time.time(), self.fleet, group, str(bundle), info["model"], info["version"],
                 info["sha256"], info["size"], "running", json.dumps(plan), ""))
        return self.resume(int(cur.lastrowid))

    def resume(self, rid: int) -> dict[str, Any]:
        r = self.get(rid)
        if r["state"] != "running":
            raise ToolkitError(f"rollout {rid} is {r['state']}; only a running rollout can be resumed")
        plan = r["plan"]
        pub = self.pub_factory()
        try:
            while plan["wave"] < len(plan["waves"]):
                wave = plan["waves"][plan["wave"]]
                self.echo(f"rollout {rid}: wave {plan['wave'] + 1}/{len(plan['waves'])}: {', '.join(wave)}")
                for dev in wave:
                    pub.desire(r["model"], r["version"], r["sha256"], r["size"], device=dev)
                results = self._await(r, wave, plan["timeout"])
                plan["results"].update(results)
                failed = [d for d, s in results.items() if s != "installed"]
                self.echo(f"rollout {rid}: wave {plan['wave'] + 1}: {len(wave) - len(failed)} installed, "
                          f"{len(failed)} failed {failed or ''}")
                if len(failed) > plan["max_failures"]:
                    for dev in wave:
                        prev = plan["previous"].get(dev, {})
                        if results.get(dev) == "installed" and prev.get("version"):
                            pub.desire(r["model"], r["version"], prev["sha256"] or "0" * 64, r["size"],
                                       device=dev, rollback_to=int(prev["version"]))
                            plan["results"][dev] = "rolled-back"
                    r["state"] = "halted"
                    r["error"] = (f"wave {plan['wave'] + 1}: {len(failed)} device(s) failed: "
                                  + "; ".join(f"{d} ({results[d]})" for d in failed))
                    self._save(r)
                    return self.get(rid)
                plan["wave"] += 1
                self._save(r)
            r["state"] = "completed"
            self._save(r)
            return self.get(rid)
        finally:
            pub.close()

    def abort(self, rid: int) -> dict[str, Any]:
        r = self.get(rid)
        if r["state"] == "running":
            r["state"], r["error"] = "aborted", "aborted by the operator"
            self._save(r)
        return self.get(rid)

    def _await(self, r: dict[str, Any], wave: list[str], timeout: float) -> dict[str, str]:
        end, results = time.time() + timeout, {}
        started = time.time()
        while time.time() < end and len(results) < len(wave):
            for d in devices(self.broker, self.fleet, wait=self.wait):
                name = d["device"]
                if name not in wave or name in results or (d.get("t") or 0) < started - 1:
                    continue
                if d.get("installed_sha256") == r["sha256"] and d.get("status") == "installed":
                    results[name] = "installed"
                elif d.get("status") == "failed":
                    results[name] = f"failed: {d.get('error')}"
        for dev in wave:
            results.setdefault(dev, "failed: no report before the timeout")
        return results
