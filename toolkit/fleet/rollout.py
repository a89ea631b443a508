"""Staged rollouts: canary wave first, then the rest; halt and roll the wave back when devices fail.

Rollout state lives in the registry (SQLite), saved after every step, so `edgeship rollout
status/resume/abort` work after the host process restarts. A wave fails when its devices fail to
install (including a golden-set refusal) or, with an observation window, when their telemetry on the
new version is worse than the control's: the same model on the replaced version in the same group
(the devices outside the wave during the same window, and the wave's own devices before the rollout).
Worse means a higher error rate, a higher p95 (from the merged latency histograms), a different
predicted-class distribution, or inputs further from the model's reference than the control's are
from its own (see health_verdict). Offline devices skip the waves; a completed rollout sets the group's
desired state, so they (and devices that join the group later) converge when they connect.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from agent.fleet.mqtt import Broker
from toolkit.errors import ToolkitError
from toolkit.fleet.publish import Publisher
from toolkit.fleet.stats import Stats, class_shift, labels, query
from toolkit.fleet.watcher import FleetWatcher, devices
from toolkit.units import fmt_ms

POLL_S = 0.25  # how often a waiting wave looks at the live reports
MIN_REQUESTS = 20  # fewer requests than this on either side: no telemetry verdict
MIN_PREDICTIONS = 100  # fewer predictions than this on either side: no class-distribution verdict
BASELINE_WINDOW = 600.0  # seconds of pre-rollout telemetry that count as the baseline


@dataclass(frozen=True)
class Thresholds:
    """How much worse than the control a wave may be before the rollout halts."""

    max_error_increase: float = 0.02  # error rate, absolute (0.02 = 2 points)
    max_p95_increase: float = 0.25  # p95 latency, relative (0.25 = 25% slower)
    max_class_psi: float = 0.25  # PSI between the wave's and the control's predicted-class distributions
    max_input_psi_increase: float = 0.25  # the wave's input PSI (vs its reference) minus the control's
    max_accuracy_drop: float = 0.05  # live accuracy (field labels), absolute: the control's minus the wave's
    min_labels: int = 50  # labelled samples needed on each side before live accuracy is compared
    min_p95_increase_ms: float = 1.0  # and by at least this much: sub-millisecond p95s jitter by more than 25%


SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL, updated REAL, fleet TEXT, grp TEXT, bundle TEXT,
    model TEXT, version INTEGER, sha256 TEXT, size INTEGER, state TEXT, plan TEXT, error TEXT
);
"""


class Rollouts:
    def __init__(self, db: Path, broker: Broker | None = None, fleet: str = "",
                 pub_factory: Callable[[], Publisher] | None = None, wait: float = 1.0,
                 echo: Callable[[str], None] = lambda m: None, fleet_db: Path | None = None):
        """Without a broker and publisher only ``get``, ``list`` and ``abort`` work (they read and write
        the registry only)."""
        self.db = sqlite3.connect(str(db), timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.executescript(SCHEMA)
        self.broker, self.fleet, self.pub_factory, self.wait, self.echo = broker, fleet, pub_factory, wait, echo
        self.fleet_db = fleet_db or db.with_name("fleet.db")

    def _delta_bases(self, members: list[dict[str, Any]], extra: list[Path]) -> list[Path]:
        """Bundles the group runs now (found in the build registry) plus ``extra``: publish deltas against them."""
        from toolkit.fleet.sealing import plain_paths

        shas = {d.get("installed_sha256") for d in members} - {None}
        found = plain_paths(self.db, shas)  # devices that run an encrypted bundle patch its plaintext
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
              timeout: float = 300, observe: float = 0.0, thresholds: Thresholds = Thresholds(),
              delta_from: list[Path] = (), seal: Callable[[list[str]], Any] | None = None) -> dict[str, Any]:
        """``seal(devices)``: encrypt the bundle for the group's devices (returns a sealing.Sealed)."""
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
        sealed = seal([d["device"] for d in members]) if seal else None
        if sealed is not None:
            self.echo(f"encrypted for {sealed.recipients} device(s): {sealed.path}")
            bundle = sealed.path
        pub = self.pub_factory()
        try:
            info = pub.upload(bundle, self._delta_bases(members, list(delta_from)), sealed)
        finally:
            pub.close()
        for base, size in info["deltas"].items():
            self.echo(f"delta for devices running bundle base {base[:12]}: {size} bytes ({size / info['size']:.1%} of the bundle)")
        plan = {"waves": waves, "wave": 0, "max_failures": max_failures, "timeout": timeout, "observe": observe,
                **asdict(thresholds), "started": time.time(), "offline": offline,
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
        self.echo(f"  observing the wave's telemetry for {plan['observe']:g}s")
        col = Collector(self.broker, self.fleet, self.fleet_db).start()
        since = time.time()
        try:
            time.sleep(plan["observe"])  # the observation window itself
        finally:
            col.stop()
        db = open_db(self.fleet_db)
        try:
            old_versions = {p.get("version") for p in plan["previous"].values()} - {None, r["version"]}
            th = Thresholds(**{k: plan[k] for k in asdict(Thresholds()) if k in plan})
            verdict, summary = health_verdict(db, wave, r["model"], r["grp"], r["version"], sorted(old_versions),
                                              since, time.time(), plan["started"], th)
        finally:
            db.close()
        self.echo(f"  telemetry: {summary}")
        return verdict


def health_verdict(db: sqlite3.Connection, wave: list[str], model: str, group: str, version: int,
                   old_versions: list[int], since: float, until: float, started: float,
                   th: Thresholds = Thresholds()) -> tuple[str, str]:
    """Compare the wave on the new version with its control: the same model on a replaced version in the
    same group — the devices outside the wave between ``since`` and ``until``, and the wave's own devices in
    the BASELINE_WINDOW before the rollout ``started``. Returns (reason to halt or '', summary)."""
    q = ",".join("?" * len(wave))
    new = query(db, f"model = ? AND version = ? AND device IN ({q}) AND t >= ? AND t <= ?",
                [model, version, *wave, since, until])
    if not old_versions:
        return "", f"new v{version}: {_side(new)}; no previous version to compare"
    v = ",".join("?" * len(old_versions))
    old = query(db, f"model = ? AND grp = ? AND version IN ({v}) AND ("
                    f"(device NOT IN ({q}) AND t >= ? AND t <= ?) OR (device IN ({q}) AND t >= ? AND t <= ?))",
                [model, group, *old_versions, *wave, since, until, *wave, started - BASELINE_WINDOW, started])
    shift, output = class_shift(new, old, MIN_PREDICTIONS)
    new_in, old_in = new.input_psi(), old.input_psi()
    summary = (f"new v{version}: {_side(new)}; control (v{'/'.join(map(str, old_versions))} in group {group}): "
               f"{_side(old)}; predicted-class PSI {_num(shift)}")
    if new.requests < MIN_REQUESTS or old.requests < MIN_REQUESTS:
        return "", summary + f" (fewer than {MIN_REQUESTS} requests on a side: no telemetry verdict)"
    if (new.error_rate or 0) > (old.error_rate or 0) + th.max_error_increase:
        return f"error rate {new.error_rate:.2%} vs {old.error_rate:.2%} on the control", summary
    p95_new, p95_old = new.p(95), old.p(95)
    if (p95_new is not None and p95_old is not None and p95_new > p95_old * (1 + th.max_p95_increase)
            and p95_new - p95_old >= th.min_p95_increase_ms):
        return f"p95 {fmt_ms(p95_new)} vs {fmt_ms(p95_old)} on the control", summary
    if shift is not None and shift > th.max_class_psi:
        return (f"predicted classes of {output!r} differ from the control's (PSI {shift:.3f} > "
                f"{th.max_class_psi:g})"), summary
    if new_in is not None and old_in is not None and new_in - old_in > th.max_input_psi_increase:
        return (f"inputs are further from the new model's reference (PSI {new_in:.3f}) than from the "
                f"control's (PSI {old_in:.3f})"), summary
    if shift is None:
        summary += f" (fewer than {MIN_PREDICTIONS} predictions on a side: no class-distribution verdict)"
    new_l = labels(db, f"model = ? AND version = ? AND device IN ({q}) AND received >= ? AND received <= ?",
                   [model, version, *wave, since, until])
    old_l = labels(db, f"model = ? AND version IN ({v}) AND device IN (SELECT DISTINCT device FROM telemetry WHERE "
                       f"grp = ?) AND received >= ? AND received <= ?",
                   [model, *old_versions, group, started - BASELINE_WINDOW, until])
    summary += f"; live accuracy {_num(new_l.accuracy)} ({new_l.samples} labels) vs {_num(old_l.accuracy)} " \
               f"({old_l.samples} labels)"
    if min(new_l.samples, old_l.samples) < th.min_labels:
        return "", summary + f" (fewer than {th.min_labels} labels on a side: no accuracy verdict)"
    if (old_l.accuracy or 0) - (new_l.accuracy or 0) > th.max_accuracy_drop:
        return (f"live accuracy {new_l.accuracy:.2%} vs {old_l.accuracy:.2%} on the control (field labels, "
                f"{new_l.samples} and {old_l.samples})"), summary
    return "", summary


def _side(s: Stats) -> str:
    return (f"{s.requests} requests, error rate {_num(s.error_rate, '.2%')}, p95 {fmt_ms(s.p(95))}, "
            f"input PSI {_num(s.input_psi())}")


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)
