"""HTTP benchmarks of the agent (run by bench/agent_bench.py; ratios in one run).

- transports: p50 of POST /predict (int8 digits, http.client keep-alive) and RSS idle / serving of each
  server candidate (bench/http_servers.py) and of the shipped `edgeship-agent run` process.
- triton_binary: tritonclient (default settings: binary tensor data) against `edgeship-agent run`, a
  256x256x3 float32 model: end-to-end p50 / raw LiteRT invoke p50 (set_tensor + invoke).
- concurrency: requests/s of 4 concurrent client processes / 1 client, a ~3 ms model, pool of 2.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from agent_bench import p50

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
KINDS = ["h11-threads", "http.server", "asyncio-h11", "uvicorn", "aiohttp", "flask"]

CLIENT = r"""
import http.client, json, sys, time
port, seconds, body, hlen = int(sys.argv[1]), float(sys.argv[2]), open(sys.argv[3], 'rb').read(), sys.argv[4]
c = http.client.HTTPConnection('127.0.0.1', port)
def one():
    c.request('POST', '/v2/models/m/infer', body=body, headers={'Inference-Header-Content-Length': hlen})
    r = c.getresponse(); r.read(); assert r.status == 200, r.status
for _ in range(5): one()
n, end = 0, time.perf_counter() + seconds
while time.perf_counter() < end:
    one(); n += 1
print(n)
"""


def build(work: Path, key, name: str, model, x: np.ndarray, variant: str) -> Path:
    from toolkit.build.measure import LatencyConfig
    from toolkit.build.pipeline import BuildOptions, build as run_build
    from toolkit.profiles import find_profile, search_dirs

    mfile = work / f"{name}.keras"
    model.save(mfile)
    np.savez(work / f"{name}.npz", **{model.input_names[0]: x})
    fast = LatencyConfig(runs=5, seconds=0.05, warmup_seconds=0.01, gate=False)
    r = run_build(BuildOptions(model=mfile, profiles=[find_profile("rpi4-arm64", search_dirs())],
                               validation=work / f"{name}.npz", out_dir=work / f"dist-{name}", key=key, latency=fast,
                               variant=variant, version=1, name="m"))
    return r.profiles[0].bundle


def models(work: Path, key) -> dict[str, Path]:
    from toolkit.examples import write_digits
    from toolkit.tfenv import import_tf

    import_tf()
    import tf_keras as keras

    L = keras.layers
    rng = np.random.default_rng(0)
    digits = write_digits(work / "digits")
    big = keras.Sequential([L.Input((256, 256, 3), name="image"), L.Conv2D(32, 3, strides=2, activation="relu"),
                            L.Conv2D(64, 3, strides=2, activation="relu"), L.Conv2D(64, 3, activation="relu"),
                            L.Conv2D(128, 3, strides=2, activation="relu"), L.GlobalAveragePooling2D(),
                            L.Dense(10, name="scores")])
    mid = keras.Sequential([L.Input((32, 32, 16), name="x")] + [L.Conv2D(64, 3, padding="same", activation="relu")
                                                               for _ in range(5)]
                           + [L.GlobalAveragePooling2D(), L.Dense(10, name="y")])
    with np.load(digits["validation"]) as v:
        xd = v["image"][:64]
    return {"digits": build_digits(work, key, digits),
            "big": build(work, key, "big", big, rng.random((8, 256, 256, 3), np.float32), "fp32"),
            "mid": build(work, key, "mid", mid, rng.random((8, 32, 32, 16), np.float32), "fp32"),
            "_digits_x": xd}


def build_digits(work: Path, key, digits) -> Path:
    from toolkit.build.measure import LatencyConfig
    from toolkit.build.pipeline import BuildOptions, build as run_build
    from toolkit.profiles import find_profile, search_dirs

    fast = LatencyConfig(runs=5, seconds=0.05, warmup_seconds=0.01, gate=False)
    r = run_build(BuildOptions(model=digits["model"], profiles=[find_profile("rpi4-arm64", search_dirs())],
                               validation=digits["validation"], out_dir=work / "dist-d", key=key, latency=fast,
                               variant="int8", version=1, name="digits"))
    return r.profiles[0].bundle


def install(bundle: Path, state: Path, keys: Path) -> Path:
    from agent.keys import Keyring
    from agent.serve.service import Agent

    a = Agent(state, Keyring.load(keys), "aarch64")
    a.start()
    assert a.install(bundle).ok
    return a.store.slot(a.current.slot) / a.current.manifest.model_file


def start(cmd: list[str], env: dict | None = None) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
                            env={**os.environ, **(env or {})})
    for line in proc.stdout:  # log lines may come first
        if " on http://" in line:
            return proc, int(line.rsplit(":", 1)[1])
        if line.strip() == "ready":
            return proc, int(cmd[3])
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} did not start")


def agent_run(state: Path, keys: Path, extra: str = "") -> tuple[subprocess.Popen, int]:
    cfg = state.parent / f"{state.name}.toml"
    cfg.write_text(f'[agent]\nstate_dir = "{state}"\nkeyring = "{keys}"\narch = "aarch64"\nthreads = 1\n{extra}'
                   f'[http]\nport = 0\n')
    return start([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)])


def vmrss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def predict_p50(port: int, x: np.ndarray) -> float:
    c = http.client.HTTPConnection("127.0.0.1", port)
    body = json.dumps({"input": x.tolist()})

    def call() -> None:
        c.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        assert r.status == 200, r.status
    res = p50(call, 2000, 2.0)
    c.close()
    return res


def transports(state: Path, keys: Path, model_file: Path, x: np.ndarray) -> dict:
    res: dict = {}
    for rnd in range(2):  # two interleaved rounds; the best p50 of each
        for i, kind in enumerate(KINDS + ["edgeship-agent run"]):
            port = 18800 + i
            try:
                if kind == "edgeship-agent run":
                    proc, port = agent_run(state, keys)
                elif kind == "flask":
                    proc, _ = start([sys.executable, str(HERE / "http_servers.py"), "flask", str(port),
                                     str(model_file)])
                else:
                    proc, _ = start([sys.executable, str(HERE / "http_servers.py"), kind, str(port), str(state),
                                     str(keys)])
            except RuntimeError as exc:
                res[kind] = {"error": str(exc)}
                continue
            try:
                for _ in range(100):  # until it answers
                    try:
                        http.client.HTTPConnection("127.0.0.1", port, timeout=5).request("GET", "/v2/health/live")
                        break
                    except OSError:
                        time.sleep(0.05)
                idle = vmrss_mb(proc.pid)
                ms = predict_p50(port, x)
                row = {"p50_ms": ms, "rss_idle_mb": idle, "rss_serving_mb": vmrss_mb(proc.pid)}
            finally:
                proc.terminate()
                proc.wait(30)
            prev = res.get(kind)
            if prev is None or "error" in prev or ms < prev["p50_ms"]:
                res[kind] = row
            print(kind, row, flush=True)
    agent, flask = res["edgeship-agent run"], res["flask"]
    res["ratio_p50_agent_over_flask"] = agent["p50_ms"] / flask["p50_ms"]
    return res


def triton_binary(state: Path, keys: Path, model_file: Path) -> dict:
    import tritonclient.http as httpclient
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(model_file), num_threads=1)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    x = np.random.default_rng(1).random((1, 256, 256, 3), np.float32)

    def raw() -> None:
        it.set_tensor(d["index"], x)
        it.invoke()

    proc, port = agent_run(state, keys)
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        inp = httpclient.InferInput("image", [1, 256, 256, 3], "FP32")

        def e2e() -> None:
            inp.set_data_from_numpy(x)  # the client's own serialization is part of end to end
            client.infer("m", [inp]).as_numpy("scores")
        r1, e1 = p50(raw, 200, 2.0), p50(e2e, 200, 2.0)
        r2, e2 = p50(raw, 200, 2.0), p50(e2e, 200, 2.0)
        client.close()
    finally:
        proc.terminate()
        proc.wait(30)
    res = {"raw_p50_ms": min(r1, r2), "e2e_p50_ms": min(e1, e2)}
    res["ratio"] = res["e2e_p50_ms"] / res["raw_p50_ms"]
    return res


def concurrency(state: Path, keys: Path, model_file: Path, work: Path) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(model_file), num_threads=1)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    x = np.random.default_rng(2).random(d["shape"], np.float32)
    it.set_tensor(d["index"], x)
    raw = p50(it.invoke, 100, 1.0)
    head = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    (work / "req.bin").write_bytes(head + x.tobytes())
    its = [it, Interpreter(model_path=str(model_file), num_threads=1)]
    its[1].allocate_tensors()
    its[1].set_tensor(d["index"], x)

    def raw_rate(k: int) -> float:
        """Invokes/s of k bare interpreters on k threads: what the machine gives right now."""
        counts = [0] * k

        def loop(i: int) -> None:
            end = time.perf_counter() + 1.0
            while time.perf_counter() < end:
                its[i].invoke()
                counts[i] += 1
        threads = [threading.Thread(target=loop, args=(i,)) for i in range(k)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return float(sum(counts))

    proc, port = agent_run(state, keys, "interpreters = 2\n")

    def rps(n: int) -> float:
        clients = [subprocess.Popen([sys.executable, "-c", CLIENT, str(port), "2", str(work / "req.bin"),
                                     str(len(head))], stdout=subprocess.PIPE, text=True) for _ in range(n)]
        return sum(int(c.communicate()[0]) for c in clients) / 2.0

    res: dict = {"raw_p50_ms": raw, "interpreters": 2, "rounds": []}
    try:  # paired rounds: the load other processes put on the 2 cores drifts; each round compares like with like
        for _ in range(5):
            r = {"rps_1": rps(1), "rps_4": rps(4), "raw_rate_1": raw_rate(1), "raw_rate_2": raw_rate(2)}
            r["ratio"], r["raw_ratio"] = r["rps_4"] / r["rps_1"], r["raw_rate_2"] / r["raw_rate_1"]
            res["rounds"].append(r)
            print("round", r, flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    res["ratio"] = float(np.median([r["ratio"] for r in res["rounds"]]))
    res["raw_ratio_2_interpreters"] = float(np.median([r["raw_ratio"] for r in res["rounds"]]))
    res["loadavg_1min"] = os.getloadavg()[0]  # other processes on the 2 cores cap what 4 clients can get
    return res


def run_all(sections: tuple[str, ...] = ("triton_binary_256", "concurrency", "transports")) -> dict:
    from toolkit.signing import load_or_create

    out: dict = {"loadavg_1min_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        keys = work / "keys"
        key = load_or_create(keys / "signing.pem")
        b = models(work, key)
        files = {name: install(b[name], work / f"s-{name}", keys) for name in ("digits", "big", "mid")}
        run = {"triton_binary_256": lambda: triton_binary(work / "s-big", keys, files["big"]),
               "concurrency": lambda: concurrency(work / "s-mid", keys, files["mid"], work),
               "transports": lambda: transports(work / "s-digits", keys, files["digits"], b["_digits_x"][0])}
        for name in sections:
            out[name] = run[name]()
            print(json.dumps({name: out[name]}), flush=True)
    return out
