"""Measure one model the way TFLite's benchmark_model does, in a fresh process.

Run as ``python -m toolkit.build.latency_worker MODEL --threads N [--inputs x.npz]``; prints one JSON line.
It imports only numpy and the agent's runtime layer, so it also runs inside a device-runtime
environment (e.g. a venv with tflite-runtime 2.14 and numpy<2) to check that a model loads there.
Steps: init (load + allocate), first inference, warm-up (>= min runs and >= min seconds), then the
measured runs (>= min runs and >= min seconds); reports every run's time (the parent computes the
percentiles) and the process's peak RSS. Inputs follow the sample layout of ``agent.layout``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM from /proc (ru_maxrss would include the parent's peak: Linux keeps it over exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prefer", default=None)
    ap.add_argument("--inputs", default=None)
    ap.add_argument("--warmup-runs", type=int, default=1)
    ap.add_argument("--warmup-seconds", type=float, default=0.5)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--eval", default=None, help="npz of inputs to run through the model")
    ap.add_argument("--eval-out", default=None, help="where to write the outputs of --eval (npz)")
    a = ap.parse_args(argv)

    import numpy as np

    from agent.runtime import load_model

    base_rss = _status_mb("VmRSS")
    try:
        t0 = time.perf_counter()
        model = load_model(a.model, threads=a.threads, prefer=a.prefer)
        init_ms = (time.perf_counter() - t0) * 1e3
        if a.eval:
            feed = _feed(model, a.eval)
            outs = model.predict(feed)
            np.savez(a.eval_out, **{f"{i}:{k}": v for i, (k, v) in enumerate(outs.items())})
        if a.inputs:
            arrays = model.arrange([x[:1] for x in _feed(model, a.inputs)])
        else:  # one sample of random floats / zeros, 1 for every dynamic dimension
            rng = np.random.default_rng(0)
            arrays = model.arrange([rng.random([1 if d == -1 else d for d in s.shape], dtype=np.float32)
                                    if np.dtype(s.dtype).kind == "f" or s.quantized
                                    else np.zeros([1 if d == -1 else d for d in s.shape], s.dtype)
                                    for s in model.inputs])
        t0 = time.perf_counter()
        out = model.run(arrays)
        first_ms = (time.perf_counter() - t0) * 1e3
        finite = all(bool(np.isfinite(v).all()) for v in out.values() if v.dtype.kind == "f")
        res = {"ok": True, "runtime": model.runtime, "runtime_version": _runtime_version(model.runtime),
               "ops": model.ops(), "init_ms": init_ms, "first_ms": first_ms, "finite": finite,
               "numpy": np.__version__}
        if not a.check_only:
            model.set_raw(arrays)
            res.update(_measure(model.invoke, a))
        res["base_rss_mb"] = base_rss
        res["peak_rss_mb"] = _status_mb("VmHWM")
    except Exception as exc:  # report, don't crash: the parent turns this into a gate reason
        res = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(res) + "\n")
    return 0


def _feed(model, path: str) -> list:
    """Inputs from an npz keyed by input name; positional when the converter renamed them."""
    import numpy as np

    with np.load(path) as npz:
        names = list(npz.files)
        if all(s.name in names for s in model.inputs):
            return [npz[s.name] for s in model.inputs]
        return [npz[n] for n in names[:len(model.inputs)]]


def _measure(invoke, a) -> dict:
    start, n = time.perf_counter(), 0
    while n < a.warmup_runs or time.perf_counter() - start < a.warmup_seconds:
        invoke()
        n += 1
    times = []
    start = time.perf_counter()
    while len(times) < a.runs or time.perf_counter() - start < a.seconds:
        t = time.perf_counter()
        invoke()
        times.append(round((time.perf_counter() - t) * 1e3, 4))
    return {"warmup_runs": n, "times_ms": times}


def _runtime_version(runtime: str) -> str:
    import importlib

    mod = {"litert": "ai_edge_litert", "tflite-runtime": "tflite_runtime",
           "onnxruntime": "onnxruntime", "tensorflow": "tensorflow"}.get(runtime, runtime)
    try:
        m = importlib.import_module(mod)
        v = getattr(m, "__version__", "")
        if not v:
            from importlib.metadata import version

            v = version({"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime"}.get(mod, mod))
        return v
    except Exception:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
