"""The fleet half of `edgeship demo`: embedded broker, several agent processes, staged rollouts
(canary first), inference over the agents' HTTP API, telemetry, a delta update, and the loop back:
field labels and low-confidence samples captured on the agents, exported, built into v3, rolled out.

Every agent is a real `edgeship-agent run` process with its own state dir, configured as a
Raspberry Pi 4 (aarch64) so it accepts the rpi4-arm64 bundle (the .tflite runs the same here).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from toolkit.fleet.rollout import Thresholds

FLEET, GROUP = "demo", "demo"
LOW_CONFIDENCE = 0.9  # the agents capture requests whose top-1 probability is below this


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProcs:
    """N agent processes; stopped (terminate, then kill) by ``stop`` — call it in a finally."""

    def __init__(self, folder: Path, keyring: Path, broker_url: str, n: int):
        self.folder, self.procs, self.ports = folder, {}, {}
        for i in range(1, n + 1):
            name = f"pi-{i:02d}"
            conf = folder / f"{name}.toml"
            conf.write_text(f'[agent]\nstate_dir = "{folder / name}"\nkeyring = "{keyring}"\ndevice_id = "{name}"\n'
                            f'arch = "aarch64"\n[http]\nport = 0\n[mqtt]\nbroker = "{broker_url}"\n'
                            f'fleet = "{FLEET}"\ngroup = "{GROUP}"\nheartbeat = 5\n[telemetry]\ninterval = 1\n'
                            f'[capture]\nenabled = true\nlow_confidence = {LOW_CONFIDENCE}\n')
            log = open(folder / f"{name}.log", "wb")
            self.procs[name] = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(conf)],
                                                stdout=log, stderr=subprocess.STDOUT)
            log.close()

    def wait_ready(self, timeout: float = 60) -> None:
        end = time.time() + timeout
        for name in self.procs:
            while name not in self.ports:
                text = (self.folder / f"{name}.log").read_text(errors="replace")
                for line in text.splitlines():
                    if " on http://" in line and "serving" in line:
                        self.ports[name] = int(line.rsplit(":", 1)[1].strip().rstrip("/"))
                if self.procs[name].poll() is not None or time.time() > end:
                    raise RuntimeError(f"agent {name} did not start; see {self.folder / f'{name}.log'}")
                time.sleep(0.1)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def _post(port: int, path: str, doc: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(doc).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def infer(port: int, model: str, x: np.ndarray) -> tuple[np.ndarray, str | None]:
    """The prediction and the request id the agent answered with (what field labels refer to)."""
    doc = _post(port, f"/v2/models/{model}/infer", {"inputs": [{"name": "image", "shape": list(x.shape),
                                                                "datatype": "FP32", "data": x.ravel().tolist()}]})
    out = doc["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"]), doc.get("id")


def run_fleet(workdir: Path, keyring: Path, registry: Path, key, v1: Path, build_v2: Callable[[], Path],
              x: np.ndarray, y: np.ndarray, echo: Callable[[str], None], agents: int = 4,
              build_v3: Callable[[Path], Path] | None = None) -> dict:
    from agent.bundle import inspect_bundle
    from agent.fleet.mqtt import Broker
    from toolkit.fleet.broker import EmbeddedBroker
    from toolkit.fleet.collector import Collector, open_db
    from toolkit.fleet.watcher import devices
    from toolkit.fleet.views import status, table, write_report
    from toolkit.fleet.publish import Publisher
    from toolkit.fleet.rollout import Rollouts, Thresholds

    folder = workdir / "fleet"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    eb = EmbeddedBroker("127.0.0.1", _free_port()).start()
    broker = Broker.parse(eb.url)
    fleet_db = folder / "fleet.db"
    procs = AgentProcs(folder, keyring, eb.url, agents)
    col = None
    stop = threading.Event()
    try:
        echo(f"    embedded MQTT broker on {eb.url}; {agents} agent processes (logs in {folder})")
        procs.wait_ready()
        col = Collector(broker, FLEET, fleet_db).start()
        end = time.time() + 30
        while len([d for d in devices(broker, FLEET) if d.get("online")]) < agents and time.time() < end:
            time.sleep(0.2)  # poll the retained presence until every agent said it is online
        # the agents share the host's cores with the builds and the traffic: latency verdicts get room for that
        # (the other verdicts keep the defaults a real rollout has)
        th = Thresholds(max_p95_increase=1.0, min_p95_increase_ms=20.0)
        ro = Rollouts(registry, broker, FLEET, lambda: Publisher(broker, FLEET, key), wait=0.5,
                      echo=lambda m: echo(f"    {m}"), fleet_db=fleet_db)
        echo(f"5/8 rollout of {v1.name}: canary wave (25%), watched for 3 s, then the rest")
        r1 = ro.start(v1, GROUP, canary_pct=25, timeout=120, observe=3.0, thresholds=th)  # the canary alone: visible in the report
        if r1["state"] != "completed":
            raise RuntimeError(f"rollout 1 {r1['state']}: {r1.get('error')}")
        model = inspect_bundle(v1)[0]["name"]
        echo("6/8 classifying held-out digits through each agent's HTTP API (Open Inference Protocol v2); the "
             "true labels go back as field labels (POST .../feedback)")
        parts = np.array_split(np.arange(len(x)), agents)
        correct = 0
        for (name, port), idx in zip(procs.ports.items(), parts):
            probs, rid = infer(port, model, x[idx])
            pred = probs.argmax(1)
            _post(port, f"/v2/models/{model}/feedback", {"id": rid, "labels": [int(c) for c in y[idx]]})
            correct += int((pred == y[idx]).sum())
            echo(f"    {name} (http://127.0.0.1:{port}): {len(idx)} digits, accuracy {np.mean(pred == y[idx]):.4f}")
        acc = correct / len(x)

        def traffic() -> None:  # steady requests, so telemetry has something to compare
            i = 0
            while not stop.is_set():
                for port in procs.ports.values():
                    try:
                        infer(port, model, x[i % (len(x) - 4):][:4])
                    except OSError:
                        pass
                i += 4
                time.sleep(0.02)

        threading.Thread(target=traffic, daemon=True).start()
        echo("7/8 version 2: retrain only the classifier head, build, roll out as a delta update")
        v2 = build_v2()
        r2 = ro.start(v2, GROUP, canary_pct=25, timeout=120, observe=4.0, thresholds=th)
        if r2["state"] != "completed":
            raise RuntimeError(f"rollout 2 {r2['state']}: {r2.get('error')}")
        reports = devices(broker, FLEET)
        moved = [d for d in reports if d.get("transfer")]
        size = v2.stat().st_size
        for d in moved:
            t = d["transfer"]
            echo(f"    {d['device']}: v{d['version']} via {t['mode']}, {t['bytes']} of {size} bundle bytes "
                 f"({t['bytes'] / size:.1%})")
        db = open_db(fleet_db)
        try:
            since = time.time()  # one more telemetry round from every device, all on v2 by now
            ok = lambda: db.execute("SELECT COUNT(DISTINCT device) FROM telemetry WHERE t > ? AND version = 2",  # noqa: E731
                                    (since,)).fetchone()[0] >= agents
            end = time.time() + 30
            while not ok() and time.time() < end:
                time.sleep(0.2)
            echo(table(status(db, window=120), window=120))
        finally:
            db.close()
        loop = close_loop(fleet_db, workdir, model, ro, build_v3, echo, th) if build_v3 else {}
        report = write_report(fleet_db, workdir / "fleet-report.html")
        echo(f"fleet report: {report}")
        return {"accuracy": acc, "rollouts": [r1["state"], r2["state"]],
                "transfers": {d["device"]: d["transfer"] for d in moved}, "bundle_bytes": size, **loop}
    finally:
        stop.set()
        if col is not None:
            col.stop()
        procs.stop()
        eb.stop()


def close_loop(fleet_db: Path, workdir: Path, model: str, ro, build_v3: Callable[[Path], Path],
               echo: Callable[[str], None], th: Thresholds) -> dict:
    """Step 8: the low-confidence requests the agents captured, exported as build data, calibrate v3; v3 is
    rolled out like v2; live accuracy from the field labels is in the per-version table."""
    from toolkit.capture.export import export
    from toolkit.fleet.collector import open_db
    from toolkit.fleet.views import version_table, versions

    echo(f"8/8 closing the loop: requests the agents answered with less than {LOW_CONFIDENCE:.0%} confidence were "
         "captured and sent home; export them, build v3 with them, roll it out")
    db = open_db(fleet_db)
    try:
        end = time.time() + 30
        while time.time() < end and not db.execute("SELECT COUNT(*) FROM captures WHERE reasons LIKE "
                                                   "'%low-confidence%'").fetchone()[0]:
            time.sleep(0.2)
        data = workdir / "field-low-confidence.npz"
        prov = export(db, data, model=model, reason="low-confidence")
    finally:
        db.close()
    echo(f"    edgeship capture export --reason low-confidence -o {data.name}: {prov['samples']} samples from "
         f"{len(prov['devices'])} devices (v{'/v'.join(map(str, prov['versions']))})")
    v3 = build_v3(data)
    r3 = ro.start(v3, GROUP, canary_pct=25, timeout=120, observe=2.0, thresholds=th)
    if r3["state"] != "completed":
        raise RuntimeError(f"rollout 3 {r3['state']}: {r3.get('error')}")
    db = open_db(fleet_db)
    try:
        echo(version_table(versions(db, window=600)))
    finally:
        db.close()
    return {"captured_samples": prov["samples"], "v3": r3["state"]}
