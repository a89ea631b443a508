"""Fleet benchmark: rollout of a ~4 MB bundle to N simulated devices on one local Mosquitto, then a
head-only v2 as a delta update to the same devices.

    python bench/fleet_bench.py --devices 200 500 [--staged] [--out docs/benchmarks-fleet.json]

Each simulated device is the real agent update path (Agent + FleetLink: chunk download, hash checks,
crash-safe install engine, golden-set replay, hot swap); devices are spread over 2 worker processes
(one per core), each with its own state dirs. Telemetry is off here (see telemetry_bench.py).
Reported: total time from the group's desired state to the last device installed (``--staged``: from
`Rollouts.start` — upload, canary wave, rest — to completion), bundle bytes received per device /
bundle size, failures; and delta bytes / full bytes.
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

WORKER = """
import sys, time, threading, logging
sys.path.insert(0, {root!r})
from pathlib import Path
from agent.keys import Keyring
from agent.fleet.mqtt import Broker
from agent.serve.service import Agent
from agent.fleet.link import FleetLink
logging.basicConfig(level=logging.ERROR)
keyring = Keyring.load(Path({keyring!r}))
links = []
for name in sys.argv[1:]:
    a = Agent(Path({state!r}) / name, keyring, "aarch64", threads=1)
    a.start()
    link = FleetLink(a, keyring, Broker.parse({url!r}), "bench", name, "all", telemetry=None)
    link.start()
    links.append(link)
print("ready", flush=True)
sys.stdin.read()  # run until the parent closes stdin
for link in links:
    link.stop()
"""


def make_models(work: Path, home: Path) -> dict[str, Path]:
    """An MLP whose int8 weights make a ~4 MB bundle, and v2 with only the classifier head retrained."""
    from toolkit.build.pipeline import BuildOptions, build
    from toolkit.examples import digits_data
    from toolkit.build.measure import LatencyConfig
    from toolkit.profiles import find_profile, search_dirs
    from toolkit.signing import load_or_create
    from toolkit.tfenv import import_keras
    import numpy as np

    keras = import_keras()
    keras.utils.set_random_seed(0)
    d = digits_data()
    x, y = d["x_train"].reshape(-1, 64), d["y_train"]
    inp = keras.Input((64,), name="pixels")
    h = keras.layers.Dense(2048, activation="relu", name="d1")(inp)
    h = keras.layers.Dense(1920, activation="relu", name="d2")(h)
    out = keras.layers.Dense(10, activation="softmax", name="head")(keras.layers.Dense(64, name="d3")(h))
    m = keras.Model(inp, out, name="mlp")
    m.compile("adam", "sparse_categorical_crossentropy")
    m.fit(x, y, epochs=2, verbose=0)
    (work / "v1").mkdir()
    (work / "v2").mkdir()
    m.save(work / "v1" / "mlp.keras")
    for layer in m.layers:
        layer.trainable = layer.name == "head"
    m.compile("adam", "sparse_categorical_crossentropy")
    m.fit(x, y, epochs=2, verbose=0)
    m.save(work / "v2" / "mlp.keras")
    np.savez(work / "cal.npz", pixels=x[:200])
    np.savez(work / "val.npz", pixels=d["x_val"].reshape(-1, 64), y=d["y_val"])
    key = load_or_create(home / "keys" / "signing.pem")
    out = {}
    for v in (1, 2):
        opts = BuildOptions(model=work / f"v{v}" / "mlp.keras", profiles=[find_profile("rpi4-arm64", search_dirs())],
                            validation=work / "val.npz", calibration=work / "cal.npz", out_dir=work / f"dist{v}",
                            key=key, version=v, variant="int8",
                            latency=LatencyConfig(runs=5, seconds=0.02, warmup_runs=1, warmup_seconds=0.01,
                                                  gate=False))
        out[f"v{v}"] = build(opts).profiles[0].bundle
    out["keyring"] = home / "keys"
    return out


def mobilenet_delta(work: Path, home: Path) -> dict:
    """Delta of a transfer-learning update: MobileNetV2 backbone (weights=None) + 10-class head, v2 with
    only the head's weights changed; both built as full int8 for rpi4-arm64."""
    import numpy as np

    from agent.fleet.delta import make_patch
    from toolkit.build.pipeline import BuildOptions, build
    from toolkit.build.measure import LatencyConfig
    from toolkit.profiles import find_profile, search_dirs
    from toolkit.fleet.publish import base_content
    from toolkit.signing import load_or_create
    from toolkit.tfenv import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(input_shape=(224, 224, 3), weights=None, include_top=False, pooling="avg")
    out = keras.layers.Dense(10, activation="softmax", name="head")(base.output)
    m = keras.Model(base.input, out, name="mnv2_10")
    rng = np.random.default_rng(0)
    x = rng.random((16, 224, 224, 3), dtype=np.float32)
    name = m.inputs[0].name.split(":")[0]
    np.savez(work / "mcal.npz", **{name: x[:8]})
    np.savez(work / "mval.npz", **{name: x[8:]})
    key = load_or_create(home / "keys" / "signing.pem")
    bundles = []
    for v in (1, 2):
        if v == 2:
            w, b = m.get_layer("head").get_weights()
            m.get_layer("head").set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype), b + 0.01])
        (work / f"m{v}").mkdir()
        m.save(work / f"m{v}" / "mnv2_10.keras")
        opts = BuildOptions(model=work / f"m{v}" / "mnv2_10.keras", profiles=[find_profile("rpi4-arm64", search_dirs())],
                            validation=work / "mval.npz", calibration=work / "mcal.npz", out_dir=work / f"mdist{v}",
                            key=key, version=v, variant="int8",
                            latency=LatencyConfig(runs=3, seconds=0.02, warmup_runs=1, warmup_seconds=0.01,
                                                  gate=False))
        bundles.append(build(opts).profiles[0].bundle)
    new = bundles[1].read_bytes()
    patch = make_patch(base_content(bundles[0]), new)["patch"]
    res = {"bundle_bytes": len(new), "patch_bytes": len(patch), "delta_over_full": round(len(patch) / len(new), 4)}
    print(f"MobileNetV2 + 10-class head, head-only change: {res}", flush=True)
    return res


def rollout(n: int, bundles: dict[str, Path], key, broker_dir: Path, staged: bool = False) -> dict:
    from agent.fleet.mqtt import Broker, make_client
    from mosquitto import Mosquitto
    from toolkit.fleet.publish import Publisher

    m = Mosquitto(broker_dir).start()
    state = Path(tempfile.mkdtemp(prefix="edgeship-fleet-bench-"))
    names = [f"sim-{i:04d}" for i in range(n)]
    workers = []
    reports: dict[str, dict] = {}
    watcher = make_client(f"bench-watch-{n}", Broker.parse(m.url))
    watcher.on_message = lambda c, u, msg: msg.payload and reports.__setitem__(
        msg.topic.split("/")[4], json.loads(msg.payload))
    watcher.connect("127.0.0.1", m.port)
    watcher.subscribe("edgeship/v1/bench/device/+/reported", 1)
    watcher.loop_start()
    try:
        code = WORKER.format(root=str(ROOT), keyring=str(bundles["keyring"]), state=str(state), url=m.url)
        for part in (names[0::2], names[1::2]):
            p = subprocess.Popen([sys.executable, "-c", code, *part], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
            workers.append(p)
        for p in workers:
            assert p.stdout.readline().strip() == "ready"
        time.sleep(2)
        b = Broker.parse(m.url)
        res = {"devices": n, "mode": "staged (10% canary, then the rest)" if staged else "one group desired state"}
        for tag, bundle, bases in (("full", bundles["v1"], []), ("delta", bundles["v2"], [bundles["v1"]])):
            if staged:  # the real rollout driver: upload, 10% canary wave, then the rest, then the group state
                from toolkit.fleet.rollout import Rollouts

                ro = Rollouts(state / "registry.db", b, "bench", lambda: Publisher(b, "bench", key), wait=1.0)
                t0 = time.perf_counter()
                r = ro.start(bundle, "all", canary_pct=10, timeout=600, delta_from=bases)
                info = {"sha256": r["sha256"], "size": r["size"], "deltas": {}}
                assert r["state"] == "completed", r.get("error")
            else:  # everything at once: one group desired state
                pub = Publisher(b, "bench", key)
                info = pub.upload(bundle, bases)
                t0 = time.perf_counter()
                pub.desire(info["model"], info["version"], info["sha256"], info["size"], group="all")
                pub.close()
            end = time.time() + 600
            def done():
                return sum(1 for r in reports.values() if r.get("installed_sha256") == info["sha256"]
                           and r.get("status") == "installed")
            while done() < n and time.time() < end:
                if sum(1 for r in reports.values() if r.get("status") == "failed") > 0:
                    break
                time.sleep(0.2)
            total = time.perf_counter() - t0
            rx = [r.get("transfer", {}).get("bytes", 0) for r in reports.values()
                  if r.get("installed_sha256") == info["sha256"]]
            res[tag] = {"seconds": round(total, 1), "installed": done(), "failed": n - done(),
                        "bundle_bytes": info["size"], "bytes_per_device_over_bundle":
                        round(sum(rx) / max(len(rx), 1) / info["size"], 4),
                        "per_device_ms": round(1000 * total / n, 1)}
            if tag == "delta" and info["deltas"]:
                res[tag]["patch_bytes"] = list(info["deltas"].values())[0]
                res[tag]["delta_over_full"] = round(sum(rx) / max(len(rx), 1) / info["size"], 4)
                res[tag]["modes"] = sorted({r.get("transfer", {}).get("mode") for r in reports.values()})
            print(f"{n} devices ({res['mode']}), {tag}: {res[tag]}", flush=True)
        return res
    finally:
        for p in workers:
            p.stdin.close()
        for p in workers:
            p.wait(60)
        watcher.loop_stop()
        m.stop()
        import shutil
        shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, nargs="+", default=[200, 500])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks-fleet.json")
    ap.add_argument("--skip-mobilenet", action="store_true", help="Skip the MobileNetV2 head-only delta.")
    ap.add_argument("--staged", action="store_true", help="Also run each size through `edgeship rollout` waves.")
    args = ap.parse_args()
    from toolkit.signing import load_or_create

    work = Path(tempfile.mkdtemp(prefix="edgeship-fleet-models-"))
    bundles = make_models(work, work / "home")
    key = load_or_create(work / "home" / "keys" / "signing.pem")
    results = {"bundle_v1_bytes": bundles["v1"].stat().st_size, "runs": []}
    if not args.skip_mobilenet:
        results["mobilenet_head_delta"] = mobilenet_delta(work, work / "home")
    for n in args.devices:
        d = Path(tempfile.mkdtemp(prefix="edgeship-mosq-bench-"))
        results["runs"].append(rollout(n, bundles, key, d))
        if args.staged:
            results["runs"].append(rollout(n, bundles, key, Path(tempfile.mkdtemp(prefix="edgeship-mosq-bench-")),
                                           staged=True))
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
