"""Agent benchmark: overhead of the agent over the raw runtime, measured as ratios in one run.

    python bench/agent_bench.py [--out docs/benchmarks-agent.json]

- Python API p50 / raw LiteRT invoke p50 (int8 MobileNetV2 224 and the int8 digits model, 1 thread).
  Raw = set_tensor of already-quantized input + invoke (what benchmark_model times); the agent adds
  float->int8 quantization, output dequantization and metrics.
- HTTP v2 /infer p50 minus raw p50 on the digits model (keep-alive connection).
- Peak RSS of a process serving int8 MobileNetV2 through the agent vs a raw LiteRT process.
- Cold start: process start -> model loaded (after a crash-safe recovery check) -> first answer.
- HTTP transports (bench/http_servers.py): p50 of POST /predict on the int8 digits model and RSS idle /
  serving for the agent's own transport (h11, a thread per connection), the standard library's
  http.server, asyncio + h11, uvicorn, aiohttp, and a hand-written Flask + LiteRT server; same client
  (http.client, keep-alive), each server in its own process.
- v2 binary infer of a 256x256x3 float32 model through tritonclient (default settings) against an
  `edgeship-agent run` process: end-to-end p50 / raw LiteRT invoke p50.
- Throughput of 4 concurrent client processes / 1 client on a ~3 ms model (interpreter pool of 2).

    python bench/agent_bench.py --only http     # just the HTTP sections
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RAW = """
import sys, time, numpy as np
from ai_edge_litert.interpreter import Interpreter
it = Interpreter(model_path=sys.argv[1], num_threads=1); it.allocate_tensors()
d = it.get_input_details()[0]
x = np.zeros(d['shape'], d['dtype'])
for _ in range(20): it.set_tensor(d['index'], x); it.invoke()
print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])
"""
AGENT = """
import sys, time
t0 = time.perf_counter()
import numpy as np
from pathlib import Path
from agent.keys import Keyring
from agent.serve.service import Agent
a = Agent(Path(sys.argv[1]), Keyring.load(sys.argv[2]), 'aarch64', threads=1)
a.start()
x = np.zeros([1 if d == -1 else d for d in a.current.model.inputs[0].shape], np.float32)
a.predict(x)
ready = time.perf_counter() - t0
for _ in range(19): a.predict(x)
print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0], ready)
"""


def p50(fn, runs: int, seconds: float) -> float:
    for _ in range(5):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < runs or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.percentile(times, 50))


def bench_model(name: str, bundle: Path, keyring: Path, state: Path, x: np.ndarray, with_http: bool) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    from agent.serve.http import make_server, serve_in_thread
    from agent.keys import Keyring
    from agent.serve.service import Agent

    agent = Agent(state, Keyring.load(keyring), "aarch64", threads=1)
    agent.start()
    assert agent.install(bundle).ok
    model_file = agent.store.slot(agent.current.slot) / agent.current.manifest.model_file
    it = Interpreter(model_path=str(model_file), num_threads=1)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    from agent.runtime import quantize

    xq = quantize(x, agent.current.model.inputs[0])

    def raw() -> None:
        it.set_tensor(d["index"], xq)
        it.invoke()

    res = {"model": name}
    # interleave to share machine noise
    r1, a1 = p50(raw, 200, 2.0), p50(lambda: agent.predict(x), 200, 2.0)
    r2, a2 = p50(raw, 200, 2.0), p50(lambda: agent.predict(x), 200, 2.0)
    res["raw_p50_ms"], res["agent_p50_ms"] = min(r1, r2), min(a1, a2)
    res["api_ratio"] = res["agent_p50_ms"] / res["raw_p50_ms"]
    if with_http:
        server = make_server(agent, "127.0.0.1", 0)
        serve_in_thread(server)
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1])
        body = json.dumps({"inputs": [{"name": agent.current.model.inputs[0].name, "shape": list(x.shape),
                                       "datatype": "FP32", "data": x.ravel().tolist()}]})

        def call() -> None:
            conn.request("POST", f"/v2/models/{agent.current.manifest.name}/infer", body=body,
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            assert r.status == 200

        res["http_p50_ms"] = p50(call, 300, 2.0)
        res["http_overhead_ms"] = res["http_p50_ms"] - res["raw_p50_ms"]
        server.shutdown()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks-agent.json"))
    ap.add_argument("--only", choices=["all", "http", "concurrency"], default="all")
    args = ap.parse_args()
    if args.only != "all":
        from http_bench import run_all

        out = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
        out.update(run_all(("concurrency",)) if args.only == "concurrency" else run_all())
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}")
        return
    from toolkit.build.pipeline import BuildOptions, build
    from toolkit.examples import mobilenet_v2, write_digits
    from toolkit.build.measure import LatencyConfig
    from toolkit.profiles import find_profile, search_dirs
    from toolkit.signing import load_or_create

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        key = load_or_create(work / "keys" / "signing.pem")
        prof = find_profile("rpi4-arm64", search_dirs())
        digits = write_digits(work / "digits")
        mn = mobilenet_v2()
        mn.save(work / "mobilenet_v2.keras")
        rng = np.random.default_rng(0)
        np.savez(work / "mn.npz", **{mn.input_names[0]: rng.random((32, 224, 224, 3), np.float32) * 2 - 1})
        fast = LatencyConfig(runs=5, seconds=0.05, warmup_seconds=0.01, gate=False)
        bundles = {}
        for name, model, val in (("digits", digits["model"], digits["validation"]),
                                 ("mobilenet_v2", work / "mobilenet_v2.keras", work / "mn.npz")):
            r = build(BuildOptions(model=model, profiles=[prof], validation=val, out_dir=work / "dist", key=key,
                                   latency=fast, variant="int8", version=1, name=name.replace("_", "-")))
            bundles[name] = r.profiles[0].bundle
        with np.load(digits["validation"]) as v:
            xd = v["image"][:1]
        xm = rng.random((1, 224, 224, 3), np.float32) * 2 - 1
        out["digits"] = bench_model("digits int8", bundles["digits"], work / "keys", work / "s1", xd, True)
        out["mobilenet_v2"] = bench_model("MobileNetV2 int8", bundles["mobilenet_v2"], work / "keys",
                                          work / "s2", xm, False)
        for k in ("digits", "mobilenet_v2"):
            print(json.dumps(out[k]))
        # RSS and cold start, fresh processes
        slot = work / "s2" / "slots"
        model_file = next(slot.glob("*/model.tflite"))
        raw_kb = int(subprocess.run([sys.executable, "-c", RAW, str(model_file)], capture_output=True,
                                    text=True, check=True).stdout.split()[0])
        starts, agent_kb = [], 0
        for _ in range(3):
            o = subprocess.run([sys.executable, "-c", AGENT, str(work / "s2"), str(work / "keys")],
                               capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
            starts.append(float(o[1]))
            agent_kb = int(o[0])
        out["rss"] = {"raw_mb": raw_kb / 1024, "agent_mb": agent_kb / 1024,
                      "delta_mb": (agent_kb - raw_kb) / 1024}
        out["cold_start_s"] = min(starts)
        print(json.dumps({"rss": out["rss"], "cold_start_s": out["cold_start_s"]}))
    out.update(http_benchmarks())
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


def http_benchmarks() -> dict:
    from http_bench import run_all

    return run_all()


if __name__ == "__main__":
    main()
