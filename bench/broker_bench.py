"""Broker persistence benchmark: what a persistence setting costs when a bundle is published, on a broker
that already retains an archive of older bundles (its database grows with every bundle published):
Mosquitto's default (`autosave_interval 1800` s), the shipped one (deploy/mosquitto/edgeship.conf: every
30 s), and "every change" (`autosave_on_changes true`, `autosave_interval 1`: a SIGKILL loses nothing).

    python bench/broker_bench.py [--bundle-mb 4] [--archive-mb 0 16 64] [--out docs/benchmarks-broker.json]

Per archive size and configuration: seconds to publish one bundle as retained 64 KiB chunks (QoS 1, every
chunk acknowledged), how many times Mosquitto wrote its database meanwhile, and the database size (a
time-based setting writes that much every interval, busy or idle). Ratios are against the default
configuration in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

CHUNK = 64 * 1024


CONFIGS = {"default": "", "every-change": "autosave_on_changes true\nautosave_interval 1\n"}


def shipped_autosave() -> str:
    """The persistence lines of deploy/mosquitto/edgeship.conf (persistence_location is the test's)."""
    keep = ("autosave_on_changes", "autosave_interval", "persistence_file")
    lines = [ln.split("#", 1)[0].strip() for ln in (ROOT / "deploy" / "mosquitto" / "edgeship.conf").read_text().splitlines()]
    return "".join(f"{ln}\n" for ln in lines if ln.split(" ", 1)[0] in keep)


def publish(url: str, prefix: str, data: bytes) -> float:
    from agent.fleet.mqtt import Broker, connect_blocking, make_client

    b = Broker.parse(url)
    c = make_client(f"bench-{time.time_ns()}", b)
    connect_blocking(c, b)
    t = time.perf_counter()
    infos = [c.publish(f"{prefix}/chunk/{i}", data[i * CHUNK:(i + 1) * CHUNK], qos=1, retain=True)
             for i in range(-(-len(data) // CHUNK))]
    for info in infos:
        info.wait_for_publish(300)
    took = time.perf_counter() - t
    c.disconnect()
    c.loop_stop()
    return took


def run(config: str, archive_mb: int, bundle: bytes) -> dict:
    from mosquitto import Mosquitto

    folder = Path(tempfile.mkdtemp(prefix="edgeship-bench-mosq-"))
    m = Mosquitto(folder, extra=shipped_autosave() if config == "shipped" else CONFIGS[config]).start()
    try:
        for k in range(archive_mb // 4):  # older bundles the broker retains
            publish(m.url, f"edgeship/v1/bench/bundle/archive{k}", os.urandom(4 << 20))
        log = folder / "mosquitto.log"
        saves_before = log.read_text().count("Saving in-memory database")
        seconds = publish(m.url, "edgeship/v1/bench/bundle/new", bundle)
        saves = log.read_text().count("Saving in-memory database") - saves_before
        m.stop()  # a clean stop writes the database: its size
        db_mb = sum(f.stat().st_size for f in folder.glob("*.db")) / 2**20
    finally:
        m.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return {"config": config, "archive_mb": archive_mb, "bundle_mb": len(bundle) / 2**20, "seconds": round(seconds, 3),
            "database_writes": saves, "database_mb": round(db_mb, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle-mb", type=int, default=4)
    ap.add_argument("--archive-mb", type=int, nargs="+", default=[0, 16, 64])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    bundle = os.urandom(args.bundle_mb << 20)
    rows = []
    for archive in args.archive_mb:
        base = run("default", archive, bundle)
        rows.append(base)
        for config in ("shipped", "every-change"):
            r = run(config, archive, bundle)
            r["ratio_vs_default"] = round(r["seconds"] / base["seconds"], 2)
            rows.append(r)
            print(f"archive {archive:>3} MB: {config:<12} {r['seconds']:6.2f} s to publish, {r['database_writes']:>3} "
                  f"database writes of {r['database_mb']} MB, x{r['ratio_vs_default']} vs default "
                  f"({base['seconds']:.2f} s)")
    if args.out:
        args.out.write_text(json.dumps({"bundle_mb": args.bundle_mb, "chunk_bytes": CHUNK, "mosquitto": "2.0.11",
                                        "shipped": shipped_autosave().split("\n")[:-1], "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
