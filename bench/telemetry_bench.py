"""Telemetry benchmark.

    python bench/telemetry_bench.py [--out docs/benchmarks-telemetry.json]

1. Collector ingestion: 100 simulated devices (paho clients in 2 separate processes) publish realistic
   telemetry records at full speed (QoS 1) to one local Mosquitto; one `Collector` stores them in
   SQLite (WAL). Rate = records stored / seconds from the first to the last stored record.
2. Agent cost: the same agent process serving 200 requests/s of the digits model for 20 s, with
   telemetry (1 s interval, drift on every request) and without: process CPU % and RSS, same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

PUBLISHER = """
import json, sys, time
sys.path.insert(0, {root!r})
from agent.fleet.mqtt import Broker, make_client
devices, per = sys.argv[1:-1], int(sys.argv[-1])
clients = []
for d in devices:
    c = make_client(f"pub-{{d}}", Broker.parse({url!r}))
    c.connect("127.0.0.1", {port})
    c.loop_start()
    clients.append((d, c))
time.sleep(1)
infos = []
for i in range(1, per + 1):
    for d, c in clients:
        doc = {{"seq": i, "dropped": 0, "v": 1, "type": "telemetry", "device": d, "group": "g", "t": time.time(),
               "interval_s": 10, "model": "digits", "version": 2,
               "inference": {{"count": 1200, "errors": 1, "p50_ms": 0.21, "p95_ms": 0.35, "p99_ms": 0.6}},
               "drift": {{"rows": 1200, "inputs": [{{"name": "image", "psi": 0.01, "mean_shift_std": 0.02}}],
                          "outputs": [{{"name": "probs", "psi": 0.02, "p": [0.1] * 10}}], "max_psi": 0.02,
                          "flag": False, "threshold": 0.25}},
               "system": {{"cpu_percent": 12.5, "rss_bytes": 61000000, "cpu_temp_c": 51.2,
                          "disk_free_bytes": 12000000000, "uptime_s": 86400}},
               "update": {{"status": "installed", "error": "", "last": None}}}}
        infos.append(c.publish(f"edgeship/v1/bench/device/{{d}}/telemetry", json.dumps(doc), qos=1))
    if len(infos) > 2000:
        for x in infos: x.wait_for_publish(30)
        infos = []
for x in infos: x.wait_for_publish(30)
for d, c in clients: c.disconnect(); c.loop_stop()
print("done", flush=True)
"""

AGENT = """
import os, sys, time, numpy as np
sys.path.insert(0, {root!r})
from pathlib import Path
from agent.keys import Keyring
from agent.fleet.mqtt import Broker
from agent.serve.service import Agent
from agent.fleet.link import FleetLink
from agent.fleet.reporter import TelemetryConfig
on = sys.argv[1] == "on"
kr = Keyring.load(Path({keyring!r}))
a = Agent(Path(sys.argv[2]), kr, "aarch64")
a.install(Path({bundle!r}))
link = FleetLink(a, kr, Broker.parse({url!r}), "bench", "dev-" + sys.argv[1], "g",
                 telemetry=TelemetryConfig(interval=1.0, heartbeat=5.0) if on else None)
link.start()
x = np.load({val!r})["image"].astype(np.float32)
time.sleep(2)
t0, c0 = time.monotonic(), sum(os.times()[:2])
i = 0
while time.monotonic() - t0 < 20:
    a.predict(x[i % 500:][:1]); i += 1
    time.sleep(max(0.0, t0 + i / 200 - time.monotonic()))
cpu = 100 * (sum(os.times()[:2]) - c0) / (time.monotonic() - t0)
rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
link.stop()
print(cpu, rss, i)
"""


def collector_rate(devices: int = 100, per: int = 300) -> dict:
    from agent.fleet.mqtt import Broker
    from mosquitto import Mosquitto
    from toolkit.fleet.collector import Collector, open_db

    folder = Path(tempfile.mkdtemp(prefix="edgeship-mosq-tbench-"))
    m = Mosquitto(folder).start()
    db_path = folder / "fleet.db"
    col = Collector(Broker.parse(m.url), "bench", db_path).start()
    time.sleep(1)
    names = [f"d{i:03d}" for i in range(devices)]
    code = PUBLISHER.format(root=str(ROOT), url=m.url, port=m.port)
    procs = [subprocess.Popen([sys.executable, "-c", code, *part, str(per)], stdout=subprocess.PIPE, text=True)
             for part in (names[0::2], names[1::2])]
    total = devices * per
    first = last = None
    while True:
        n = col.stored
        if n and first is None:
            first = (time.perf_counter(), n)
        if n >= total:
            last = time.perf_counter()
            break
        if all(p.poll() is not None for p in procs) and time.perf_counter() - (first or (0, 0))[0] > 60:
            break
        time.sleep(0.01)
    for p in procs:
        p.wait(60)
    col.stop()
    db = open_db(db_path)
    stored = db.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0]
    db.close()
    m.stop()
    secs = (last or time.perf_counter()) - first[0]
    return {"devices": devices, "records": total, "stored": stored, "seconds": round(secs, 2),
            "records_per_s": round((stored - first[1]) / secs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks-telemetry.json")
    ap.add_argument("--bundle", type=Path, help="A digits rpi4-arm64 bundle (built if omitted).")
    args = ap.parse_args()
    res = {"collector": collector_rate()}
    print(res, flush=True)
    from mosquitto import Mosquitto
    from toolkit.build.pipeline import BuildOptions, build
    from toolkit.examples import write_digits
    from toolkit.build.measure import LatencyConfig
    from toolkit.profiles import find_profile, search_dirs
    from toolkit.signing import load_or_create

    work = Path(tempfile.mkdtemp(prefix="edgeship-tbench-"))
    paths = write_digits(work / "ex", epochs=10)
    key = load_or_create(work / "home" / "keys" / "signing.pem")
    bundle = args.bundle or build(BuildOptions(
        model=paths["model"], profiles=[find_profile("rpi4-arm64", search_dirs())], validation=paths["validation"],
        calibration=paths["calibration"], out_dir=work / "dist", key=key, variant="int8",
        latency=LatencyConfig(runs=5, seconds=0.02, warmup_runs=1, warmup_seconds=0.01, gate=False))).profiles[0].bundle
    m = Mosquitto(Path(tempfile.mkdtemp(prefix="edgeship-mosq-tbench-"))).start()
    try:
        code = AGENT.format(root=str(ROOT), keyring=str(work / "home" / "keys"), bundle=str(bundle), url=m.url,
                            val=str(paths["validation"]))
        for mode in ("off", "on"):
            out = subprocess.run([sys.executable, "-c", code, mode, str(work / f"state-{mode}")], capture_output=True,
                                 text=True, timeout=300)
            cpu, rss, n = out.stdout.split()[-3:]
            res[f"agent_telemetry_{mode}"] = {"cpu_percent": round(float(cpu), 1), "rss_mb": round(int(rss) / 1e6, 1),
                                              "requests": int(n)}
    finally:
        m.stop()
    on, off = res["agent_telemetry_on"], res["agent_telemetry_off"]
    res["agent_telemetry_cost"] = {"cpu_percent_points": round(on["cpu_percent"] - off["cpu_percent"], 1),
                                   "rss_mb": round(on["rss_mb"] - off["rss_mb"], 1)}
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
