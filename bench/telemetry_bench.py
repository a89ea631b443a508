"""Telemetry benchmark.

    python bench/telemetry_bench.py [--out docs/benchmarks-telemetry.json]

1. Collector ingestion: 100 simulated devices (paho clients in 2 separate processes) publish realistic
   telemetry records (built by the protocol's own builder: latency histogram, drift counts) at full speed
   (QoS 1) to one local Mosquitto; one `Collector` stores them in SQLite (WAL). Rate = records stored /
   seconds from the first to the last stored record. Then `fleet status` over all of them (percentiles
   from merged histograms) vs the SQL mean-of-p95 aggregate it replaced, same database.
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
import random, sys, time
sys.path.insert(0, {root!r})
from agent.fleet.mqtt import Broker, make_client
from agent.fleet.protocol import telemetry_doc, telemetry_payload
from agent.fleet.telemetry import Window
devices, per = sys.argv[1:-1], int(sys.argv[-1])
clients = []
for d in devices:
    c = make_client(f"pub-{{d}}", Broker.parse({url!r}))
    c.connect("127.0.0.1", {port})
    c.loop_start()
    clients.append((d, c))
time.sleep(1)
rng = random.Random(0)
w = Window()  # a realistic record: 1200 requests' histogram, drift counts of one input and a 10-class output
for _ in range(1200):
    w.observe(rng.lognormvariate(-1.5, 0.4), rng.random() > 0.001)
drift = {{"rows": 1200, "inputs": [{{"name": "image", "psi": 0.01, "mean_shift_std": 0.02,
                                    "counts": [rng.randrange(9000, 11000) for _ in range(10)], "ref_p": [0.1] * 10}}],
         "outputs": [{{"name": "probs", "psi": 0.02, "p": [0.1] * 10, "counts": [120] * 10}}], "max_psi": 0.02,
         "flag": False, "threshold": 0.25}}
system = {{"cpu_percent": 12.5, "rss_bytes": 61000000, "cpu_temp_c": 51.2, "disk_free_bytes": 12000000000,
          "uptime_s": 86400}}
inference = w.snapshot()
records = {{d: telemetry_doc(d, "g", 10, "digits", 2, inference, drift, system, {{"status": "installed", "error": ""}})
           for d, _ in clients}}
print(len(telemetry_payload(records[clients[0][0]], 1, 0)), "bytes per record", flush=True)
infos = []
for i in range(1, per + 1):
    for d, c in clients:
        infos.append(c.publish(f"edgeship/v1/bench/device/{{d}}/telemetry", telemetry_payload(records[d], i, 0), qos=1))
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
    col = Collector(Broker.parse(m.url), "bench", db_path).start()  # returns once subscribed
    names = [f"d{i:03d}" for i in range(devices)]
    code = PUBLISHER.format(root=str(ROOT), url=m.url, port=m.port)
    procs = [subprocess.Popen([sys.executable, "-c", code, *part, str(per)], stdout=subprocess.PIPE, text=True)
             for part in (names[0::2], names[1::2])]
    total = devices * per
    first = last = None
    seen = 0
    while True:
        n = col.stored
        if n and first is None:
            first = (time.perf_counter(), n)
        if n > seen:
            seen, last = n, time.perf_counter()  # the time of the last record stored so far
        if n >= total:
            break
        quiet_since = last if last is not None else time.perf_counter()
        if all(p.poll() is not None for p in procs) and time.perf_counter() - quiet_since > 10:
            break  # nothing more for 10 s: the broker dropped what its queue for the collector could not hold
        time.sleep(0.01)
    for p in procs:
        p.wait(60)
    col.stop()
    db = open_db(db_path)
    stored = db.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0]
    status_cost = status_time(db)
    db.close()
    m.stop()
    secs = (last or time.perf_counter()) - first[0]
    return {"devices": devices, "records": total, "stored": stored, "lost": total - stored, "seconds": round(secs, 2),
            "records_per_s": round((stored - first[1]) / secs), "status": status_cost, "cpu": collector_cpu()}


def collector_cpu(n: int = 5000) -> dict:
    """CPU time (process time, less sensitive to a shared machine than wall time) the collector spends per
    realistic record: parse + validate + insert."""
    import random

    from agent.fleet.protocol import telemetry_doc, telemetry_payload
    from agent.fleet.telemetry import Window
    from toolkit.fleet.collector import SQL, open_db, parse

    rng = random.Random(0)
    w = Window()
    for _ in range(1200):
        w.observe(rng.lognormvariate(-1.5, 0.4), rng.random() > 0.001)
    drift = {"rows": 1200, "inputs": [{"name": "image", "psi": 0.01, "mean_shift_std": 0.02,
                                       "counts": [rng.randrange(9000, 11000) for _ in range(10)], "ref_p": [0.1] * 10}],
             "outputs": [{"name": "probs", "psi": 0.02, "p": [0.1] * 10, "counts": [120] * 10}], "max_psi": 0.02,
             "flag": False, "threshold": 0.25}
    system = {"cpu_percent": 12.5, "rss_bytes": 61000000, "cpu_temp_c": 51.2, "disk_free_bytes": 12000000000,
              "uptime_s": 86400}
    rec = telemetry_doc("d1", "g", 10, "digits", 2, w.snapshot(), drift, system, {"status": "installed", "error": ""})
    payloads = [telemetry_payload(rec, i, 0) for i in range(1, n + 1)]
    db = open_db(Path(tempfile.mkdtemp(prefix="edgeship-cpu-")) / "f.db")
    best = float("inf")
    for _ in range(3):
        db.execute("DELETE FROM telemetry")
        db.commit()
        t = time.process_time()
        rows = [parse("bench", "edgeship/v1/bench/device/d1/telemetry", p)[1] for p in payloads]
        with db:
            db.executemany(SQL["telemetry"], rows)
        best = min(best, time.process_time() - t)
    db.close()
    return {"bytes_per_record": len(payloads[0]), "cpu_us_per_record": round(best / n * 1e6, 1)}


def status_time(db) -> dict:
    """`fleet status` over every record (true p95 from merged histograms) vs the SQL-only aggregate it
    replaced (request-weighted mean of per-record p95), on the same database."""
    from toolkit.fleet.views import status

    def best(fn, n=3):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    merged = best(lambda: status(db, window=1e9))
    devices = [r[0] for r in db.execute("SELECT DISTINCT device FROM telemetry")]
    sql_only = best(lambda: [db.execute("SELECT SUM(count), SUM(errors), SUM(p95_ms * count) / SUM(count), "
                                        "MAX(dropped), MAX(max_psi) FROM telemetry WHERE device = ?", (d,)).fetchone()
                             for d in devices])
    return {"records": db.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0], "merged_histograms_s":
            round(merged, 3), "sql_mean_of_p95_s": round(sql_only, 3), "ratio": round(merged / sql_only, 1)}


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
