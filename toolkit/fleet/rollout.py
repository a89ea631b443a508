"""Staged rollouts: canary wave first, then the rest; halt and roll the wave back when devices fail.

Rollout state lives in the registry (SQLite), saved after every step, so `edgeship rollout
status/resume/abort` work after the host process restarts. A wave fails when its devices fail to
install (including a golden-set refusal) or, with an observation window, when their telemetry shows
a worse error rate or p95 latency on the new version than the replaced version shows (the rest of
the group during the same window, and the wave's own devices before the rollout). Offline devices
skip the waves; a completed rollout sets the group's desired state, so they (and devices that join the
group later) converge when they connect.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

from agent.fleet.mqtt import Broker
from toolkit.errors import ToolkitError
from toolkit.fleet.watcher import FleetWatcher, devices
from toolkit.fleet.publish import Publisher

POLL_S = 0.25  # how often a waiting wave looks at the live reports
MIN_REQUESTS = 20  # fewer requests than this on either side: no telemetry verdict
BASELINE_WINDOW = 600.0  # seconds of pre-rollout telemetry that count as the baseline

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL, updated REAL, fleet TEXT, grp TEXT, bundle TEXT,
    model TEXT, version INTEGER, sha256 TEXT, size INTEGER, state TEXT, plan TEXT, error TEXT
);
"""


class Rollouts:
    def __init__(self, db: Path, broker: Broker, fleet: str, pub_factory: Callable[[], Publisher],
                 wait: float = 1.0, echo: Callable[[str], None] = lambda m: None, fleet_db: Path | None = None):
        self.db = sqlite3.connect(str(db), timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.executescript(SCHEMA)
        self.broker, self.fleet, self.pub_factory, self.wait, self.echo = broker, fleet, pub_factory, wait, echo
        self.fleet_db = fleet_db or db.with_name("fleet.db")

    def _delta_bases(self, members: list[dict[str, Any]], extra: list[Path]) -> list[Path]:
        """Bundles the group runs now (found in the build registry) plus ``extra``: publish deltas against them."""
        shas = {d.get("installed_sha256") for d in members} - {None}
        found = []
        try:
            for (path,) in self.db.execute(f"SELECT bundle_path FROM builds WHERE bundle_sha256 IN "
                                           f"({','.join('?' * len(shas))})", sorted(shas)):
                if Path(path).is_file():
                    found.append(Path(path))
        except sqlite3.Error:
            pass  # no builds in this registry
        return list(dict.fromkeys([*extra, *found]))

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
              timeout: float = 300, observe: float = 0.0, max_error_increase: float = 0.02,
              max_p95_increase: float = 0.25, delta_from: list[Path] = ()) -> dict[str, Any]:
        members = [d for d in devices(self.broker, self.fleet) if d.get("group") == group]
        if not members:
            raise ToolkitError(f"group {group!r} has no devices reporting in fleet {self.fleet!r}")
        online = [d["device"] for d in members if d.get("online")]
        offline = sorted({d["device"] for d in members} - set(online))
        if not online:
            raise ToolkitError(f"group {group!r}: all {len(members)} device(s) are offline")
        if offline:
            self.echo(f"{len(offline)} offline device(s) skip the waves and converge when they come back: "
                      + ", ".join(offline))
        names = online
        n_canary = max(1, math.ceil(len(names) * canary_pct / 100))
        waves = [names[:n_canary]] + ([names[n_canary:]] if names[n_canary:] else [])
        pub = self.pub_factory()
        try:
            info = pub.upload(bundle, self._delta_bases(members, list(delta_from)))
        finally:
            pub.close()
        for base, size in info["deltas"].items():
            self.echo(f"delta for devices running bundle base {base[:12]}: {size} bytes ({size / info['size']:.1%} of the bundle)")
        plan = {"waves": waves, "wave": 0, "max_failures": max_failures, "timeout": timeout, "observe": observe,
                "max_error_increase": max_error_increase, "max_p95_increase": max_p95_increase,
                "started": time.time(), "offline": offline,
                "previous": {d["device"]: {"version": d.get("version"), "sha256": d.get("installed_sha256")}
                             for d in members}, "results": {}}
        with self.db:
            cur = self.db.execute(
                "INSERT INTO rollouts (created, updated, fleet, grp, bundle, model, version, sha256, size, state,"
                " plan, error) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (time.time(), time.time(), self.fleet, group, str(bundle), info["model"], info["version"],
                 info["sha256"], info["size"], "running", json.dumps(plan), ""))
        return self.resume(int(cur.lastrowid), reassert=False)

    def resume(self, rid: int, reassert: bool = True) -> dict[str, Any]:
        """Continue a running rollout. ``reassert``: first publish again what the broker must retain for it
        (the bundle's chunks and index, the desired states already set), in case the broker lost them."""
        r = self.get(rid)
        if r["state"] != "running":
            raise ToolkitError(f"rollout {rid} is {r['state']}; only a running rollout can be resumed")
        plan = r["plan"]
        pub = self.pub_factory()
        watcher = FleetWatcher(self.broker, self.fleet).start()  # one live subscription for the whole run
        try:
            if reassert:
                self._reassert(r, pub)
            while plan["wave"] < len(plan["waves"]):
                if self.get(rid)["state"] != "running":  # aborted from another process
                    return self.get(rid)
                wave = plan["waves"][plan["wave"]]
                self.echo(f"rollout {rid}: wave {plan['wave'] + 1}/{len(plan['waves'])}: {', '.join(wave)}")
                seqs = {}
                for dev in wave:
                    topic = pub.desire(r["model"], r["version"], r["sha256"], r["size"], device=dev)
                    seqs[dev] = pub.last_seq
                    plan.setdefault("retained", {})[topic] = pub.last_payload.decode()
                self._save(r)
                results = self._await(r, seqs, plan["timeout"], watcher)
                if self.get(rid)["state"] != "running":
                    return self.get(rid)
                installed = [d for d, v in results.items() if v == "installed"]
                if plan.get("observe") and len(installed) == len(wave):
                    verdict = self._observe(r, wave)
                    if verdict:
                        results = {d: f"failed: {verdict}" for d in wave}
                plan["results"].update(results)
                failed = [d for d, s in results.items() if s != "installed"]
                self.echo(f"rollout {rid}: wave {plan['wave'] + 1}: {len(wave) - len(failed)} installed, "
                          f"{len(failed)} failed {failed or ''}")
                if len(failed) > plan["max_failures"]:
                    for dev in wave:
                        prev = plan["previous"].get(dev, {})
                        if dev in installed and prev.get("version"):
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
            # the group's retained desired state: offline devices and devices that join later converge
            pub.desire(r["model"], r["version"], r["sha256"], r["size"], group=r["grp"])
            r["state"] = "completed"
            self._save(r)
            return self.get(rid)
        finally:
            watcher.stop()
            pub.close()

    def _reassert(self, r: dict[str, Any], pub: Publisher) -> None:
        bundle = Path(r["bundle"])
        if bundle.is_file():
            pub.upload(bundle)  # content-addressed: publishing it again is harmless
        else:
            self.echo(f"rollout {r['id']}: {bundle} is gone; cannot publish its chunks again")
        for topic, payload in r["plan"].get("retained", {}).items():
            pub.retain(topic, payload.encode())  # the same signed message: devices that had it ignore it
        self.echo(f"rollout {r['id']}: re-published the bundle and {len(r['plan'].get('retained', {}))} "
                  f"desired state(s)")

    def abort(self, rid: int) -> dict[str, Any]:
        r = self.get(rid)
        if r["state"] == "running":
            r["state"], r["error"] = "aborted", "aborted by the operator"
            self._save(r)
        return self.get(rid)

    def _await(self, r: dict[str, Any], seqs: dict[str, int], timeout: float,
               watcher: FleetWatcher) -> dict[str, str]:
        """Wait for each device's report on the desired state with seq ``seqs[device]`` (or an abort)."""
        wave = list(seqs)
        end, results = time.time() + timeout, {}
        started, shown, first = time.time(), "", True
        while time.time() < end and len(results) < len(wave) and self.get(r["id"])["state"] == "running":
            if not first:
                time.sleep(POLL_S)
            first = False
            states: dict[str, str] = {}
            for d in watcher.snapshot():
                name = d["device"]
                if name not in seqs or name in results:
                    continue
                if (d.get("seq") or 0) < seqs[name]:  # a report from before this wave's desired state
                    continue
                states[name] = d.get("status") or "?"
                if d.get("installed_sha256") == r["sha256"] and d.get("status") == "installed":
                    results[name] = "installed"
                elif d.get("status") == "failed":
                    results[name] = f"failed: {d.get('error')}"
            ok = sum(v == "installed" for v in results.values())
            busy = sorted(f"{n}:{s}" for n, s in states.items() if n not in results)
            line = (f"  {ok}/{len(wave)} installed, {len(results) - ok} failed"
                    + (f", in progress: {' '.join(busy)}" if busy else ""))
            if line != shown:
                self.echo(f"{line}  ({time.time() - started:.0f}s)")
                shown = line
        for dev in wave:
            results.setdefault(dev, "failed: no report before the timeout")
        return results

    def _observe(self, r: dict[str, Any], wave: list[str]) -> str:
        """Collect telemetry for the observation window; '' when the wave is healthy, else why not."""
        from toolkit.fleet.collector import Collector, open_db

        plan = r["plan"]
        since = time.time()
        self.echo(f"  observing the wave's telemetry for {plan['observe']:g}s")
        col = Collector(self.broker, self.fleet, self.fleet_db).start()
        try:
            time.sleep(plan["observe"])
        finally:
            col.stop()
        db = open_db(self.fleet_db)
        try:
            old_versions = {p.get("version") for p in plan["previous"].values()} - {None, r["version"]}
            verdict, summary = health_verdict(db, wave, r["version"], sorted(old_versions), since,
                                              plan["started"] - BASELINE_WINDOW, plan["max_error_increase"],
                                              plan["max_p95_increase"])
        finally:
            db.close()
        self.echo(f"  telemetry: {summary}")
        return verdict


def _stats(db: sqlite3.Connection, where: str, args: list[Any]) -> tuple[int, float, float | None]:
    from toolkit.fleet.collector import aggregate

    n, errs, p95, _ = aggregate(db, where, args)
    return n, errs / n if n else 0.0, p95


def health_verdict(db: sqlite3.Connection, wave: list[str], version: int, old_versions: list[int],
                   since: float, baseline_since: float, max_error_increase: float,
                   max_p95_increase: float) -> tuple[str, str]:
    """Compare the wave on the new version with the replaced version (other devices of the fleet in
    the same window and the wave before the rollout). Returns (reason to halt or '', summary)."""
    q = ",".join("?" * len(wave))
    new = _stats(db, f"device IN ({q}) AND version = ? AND t >= ?", [*wave, version, since])
    if not old_versions:
        return "", f"new v{version}: {new[0]} requests, error rate {new[1]:.2%}; no previous version to compare"
    v = ",".join("?" * len(old_versions))
    old = _stats(db, f"version IN ({v}) AND t >= ?", [*old_versions, baseline_since])
    summary = (f"new v{version}: {new[0]} requests, error rate {new[1]:.2%}, p95 {_ms(new[2])}; "
               f"replaced v{'/'.join(map(str, old_versions))}: {old[0]} requests, error rate {old[1]:.2%}, "
               f"p95 {_ms(old[2])}")
    if new[0] < MIN_REQUESTS or old[0] < MIN_REQUESTS:
        return "", summary + f" (fewer than {MIN_REQUESTS} requests on a side: no telemetry verdict)"
    if new[1] > old[1] + max_error_increase:
        return f"error rate {new[1]:.2%} vs {old[1]:.2%} on the replaced version", summary
    if new[2] is not None and old[2] is not None and new[2] > old[2] * (1 + max_p95_increase):
        return f"p95 {_ms(new[2])} vs {_ms(old[2])} on the replaced version", summary
    return "", summary


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} ms"
