"""Prediction capture benchmark: what capture costs the agent, and what it sends home.

    python bench/capture_bench.py [--out docs/benchmarks-capture.json] [--seconds 15]

- Cost: two `edgeship-agent run` processes serving the digits model, connected to one embedded
  broker; one without capture, one with `[capture] enabled = true, rate = 0.01`. Each gets 200 requests/s
  (v2 JSON over a keep-alive connection, paced open-loop) for SECONDS, one after the other, twice (off, on,
  off, on): process CPU (utime + stime over the window, in % of one core) and RSS at the end, same run.
- Inline: the Python API's time per request with capture off vs on (1%, ids remembered for labels), the
  same agent and model in one process, alternating blocks: what the decision and the bookkeeping add.
- Bytes home: per captured sample, the bytes of its capture message share (record + header entry, 50
  records packed per message as the agent sends them) vs the raw bytes of its inputs and outputs; for the
  digits model (8x8x1 float32 in, 10 probabilities out) and for a real photo (scikit-learn's sample image
  cut to 224x224x3 float32 in [0, 1], 1000 class probabilities out).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RATE = 200.0


def _cpu_rss(pid: int) -> tuple[float, int]:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    rss = int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) * 1024
    return cpu, rss


def _start(folder: Path, name: str, keyring: Path, broker: str, bundle: Path, capture: str) -> tuple[subprocess.Popen, int]:
    conf = folder / f"{name}.toml"
    conf.write_text(f'[agent]\nstate_dir = "{folder / name}"\nkeyring = "{keyring}"\ndevice_id = "{name}"\n'
                    f'arch = "aarch64"\nthreads = 1\ninterpreters = 1\n[http]\nport = 0\n[mqtt]\nbroker = "{broker}"\n'
                    f'fleet = "bench"\n[telemetry]\ninterval = 10\n' + capture)
    log = folder / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(conf), "--install",
                                 str(bundle)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    end = time.time() + 60
    while time.time() < end:
        text = log.read_text(errors="replace")
        m = re.search(r"on http://[^:]+:(\d+)", text)
        if m and "install: installed" in text:
            return proc, int(m.group(1))
        time.sleep(0.1)
    raise RuntimeError(log.read_text()[-2000:])


def _load(port: int, x: np.ndarray, seconds: float) -> int:
    """200 requests/s, paced (open loop: a late request does not shift the ones after it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    bodies = [json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8, 1], "datatype": "FP32",
                                      "data": x[i].ravel().tolist()}]}) for i in range(len(x))]
    t0, n = time.perf_counter(), 0
    while (now := time.perf_counter()) - t0 < seconds:
        due = t0 + n / RATE
        if due > now:
            time.sleep(due - now)
        conn.request("POST", "/v2/models/digits/infer", bodies[n % len(bodies)], {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        n += 1
    conn.close()
    return n


def inline(work: Path, bundle: Path, keyring: Path, x: np.ndarray, n: int = 20_000) -> dict:
    """Python API (no HTTP): agent.infer per request with capture off vs on (1% rate, request ids
    remembered for labels), alternating blocks in one process; median of the per-block means."""
    from agent.capture.policy import CaptureConfig
    from agent.capture.recorder import Capture
    from agent.keys import Keyring
    from agent.serve.service import Agent

    a = Agent(work / "inline", Keyring.load(keyring), "aarch64", threads=1, interpreters=1)
    a.start()
    assert a.install(bundle).ok
    cap = Capture(CaptureConfig(enabled=True, rate=0.01), a.store.dir).start()
    xs = [x[i:i + 1] for i in range(len(x))]
    times: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for block in range(20):
            for name in ("off", "on"):
                a.capture = cap if name == "on" else None
                t0 = time.perf_counter()
                for i in range(n // 20):
                    a.infer(xs[i % len(xs)], request_id=cap.new_id() if name == "on" else None)
                times[name].append((time.perf_counter() - t0) / (n // 20) * 1e6)
    finally:
        a.capture = None
        cap.stop()
    off, on = float(np.median(times["off"])), float(np.median(times["on"]))
    return {"off_us_per_request": off, "on_us_per_request": on, "added_us": on - off}


def cost(work: Path, seconds: float, bundle: Path, keyring: Path, x: np.ndarray) -> dict:
    from toolkit.fleet.broker import EmbeddedBroker

    sock = __import__("socket").socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    eb = EmbeddedBroker("127.0.0.1", port).start()
    procs = {}
    try:
        procs["off"] = _start(work, "off", keyring, eb.url, bundle, "")
        procs["on"] = _start(work, "on", keyring, eb.url, bundle, "[capture]\nenabled = true\nrate = 0.01\n")
        for _, p in procs.values():  # warm both up
            _load(p, x, 2.0)
        res: dict = {"off": [], "on": []}
        for _ in range(2):
            for name in ("off", "on"):
                proc, p = procs[name]
                c0, _ = _cpu_rss(proc.pid)
                t0 = time.perf_counter()
                n = _load(p, x, seconds)
                dt = time.perf_counter() - t0
                c1, rss = _cpu_rss(proc.pid)
                res[name].append({"requests": n, "rate": n / dt, "cpu_percent": 100 * (c1 - c0) / dt, "rss_bytes": rss})
        db = __import__("sqlite3").connect(work / "on" / "capture.db")
        queued = db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        db.close()
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(30)
        eb.stop()
    out = {k: {"cpu_percent": float(np.mean([r["cpu_percent"] for r in v])),
               "rss_mb": float(np.mean([r["rss_bytes"] for r in v]) / 2**20),
               "req_per_s": float(np.mean([r["rate"] for r in v])), "runs": v} for k, v in res.items()}
    out["cpu_points"] = out["on"]["cpu_percent"] - out["off"]["cpu_percent"]
    out["rss_mb_delta"] = out["on"]["rss_mb"] - out["off"]["rss_mb"]
    total = sum(r["requests"] for r in res["on"]) + 2 * int(2.0 * RATE)
    out["captured"] = {"requests_sent": total, "budget_used_bytes": meta.get("budget_used", 0),
                       "still_queued": queued[0], "dropped": meta.get("dropped", 0)}
    return out


def _digits_bundle(work: Path) -> tuple[Path, Path, np.ndarray]:
    from toolkit.build.measure import LatencyConfig
    from toolkit.build.pipeline import BuildOptions, build
    from toolkit.examples import write_digits
    from toolkit.profiles import find_profile, search_dirs
    from toolkit.signing import load_or_create

    paths = write_digits(work / "digits", epochs=10)
    key = load_or_create(work / "keys" / "signing.pem")
    keyring = work / "keys" / "signing.pub"  # the agent's keyring: a .pub file (or a folder of them)
    res = build(BuildOptions(model=paths["model"], profiles=[find_profile("rpi4-arm64", search_dirs([]))],
                             validation=paths["validation"], calibration=paths["calibration"], out_dir=work / "dist",
                             key=key, meta=json.loads(paths["meta"].read_text()),
                             latency=LatencyConfig(runs=10, seconds=0.1, warmup_seconds=0.05)))
    with np.load(paths["validation"]) as v:
        x = v["image"].astype(np.float32)
    return res.profiles[0].bundle, keyring, x


def bytes_home() -> dict:
    from agent.fleet.capture_wire import encode_record, pack

    out = {}
    from sklearn.datasets import load_digits, load_sample_images

    digits = (load_digits().images[:200, :, :, None] / 16).astype(np.float32)
    photo = load_sample_images().images[0]  # 427x640x3 uint8
    crops = [(photo[r:r + 224, c:c + 224] / 255).astype(np.float32)[None] for r in (0, 100, 200) for c in range(0, 400, 40)]
    rng = np.random.default_rng(0)
    for name, xs, classes in (("digits 8x8x1 float32, 10 classes", list(digits[:, None]), 10),
                              ("photo 224x224x3 float32, 1000 classes", crops, 1000)):
        rows, raw = [], 0
        for i, xi in enumerate(xs):
            logits = rng.normal(size=(1, classes)) * 3
            p = (np.exp(logits) / np.exp(logits).sum()).astype(np.float32)
            meta = {"id": os.urandom(8).hex(), "model": "m", "version": 1, "t": time.time(), "reasons": ["rate"],
                    "layout": "batch"}
            rows.append((i + 1, encode_record(meta, [("image", xi)], [("probs", p)])))
            raw += xi.nbytes + p.nbytes
        sent = sum(len(m) for _, m in pack("pi-kitchen-01", rows, 0, 0))
        out[name] = {"samples": len(rows), "raw_bytes_per_sample": raw / len(rows),
                     "sent_bytes_per_sample": sent / len(rows), "ratio": sent / raw}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks-capture.json")
    ap.add_argument("--seconds", type=float, default=15.0)
    args = ap.parse_args()
    res = {"date": time.strftime("%Y-%m-%d"), "bytes_home": bytes_home()}
    print(json.dumps(res["bytes_home"], indent=2))
    with tempfile.TemporaryDirectory(prefix="edgeship-capture-bench-") as tmp:
        work = Path(tmp)
        bundle, keyring, x = _digits_bundle(work)
        res["inline"] = inline(work, bundle, keyring, x)
        print(json.dumps(res["inline"], indent=2))
        res["cost"] = cost(work, args.seconds, bundle, keyring, x)
    print(json.dumps({k: v for k, v in res["cost"].items() if k not in ("off", "on")}, indent=2))
    print({k: {kk: vv for kk, vv in res["cost"][k].items() if kk != "runs"} for k in ("off", "on")})
    args.out.write_text(json.dumps(res, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
