"""Build benchmark: per-variant size and latency ratios against fp32, measured in one run.

    python bench/build_bench.py [--out docs/benchmarks-build.json]

Models: the digits example (trained here) and a MobileNetV2-shaped model (keras.applications,
weights=None, 224x224). Latency uses the benchmark_model method (toolkit.build.latency_worker), 1 thread.
Also times `edgeship --help` and a 3-profile `edgeship build` of the digits model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def variants(source, calib, val, labels, work: Path, onnx: bool) -> list[dict]:
    from toolkit.build import convert_onnx, convert_tflite
    from toolkit.build.measure import LatencyConfig, compare, run_worker
    from toolkit.build.package import npz_bytes

    ref = source.predict(val)
    bench = work / "bench.npz"
    bench.write_bytes(npz_bytes({s.name: a[:1] for s, a in zip(source.inputs, val)}))
    evals = work / "eval.npz"
    evals.write_bytes(npz_bytes({s.name: a for s, a in zip(source.inputs, val)}))
    jobs = [("tflite", p) for p in ("fp32", "fp16", "dynamic-int8", "int8")]
    if onnx:
        jobs += [("onnx", p) for p in ("fp32", "int8")]
    rows, base = [], None
    for fmt, prec in jobs:
        path = work / f"{fmt}-{prec}.{fmt}"
        if fmt == "tflite":
            path.write_bytes(convert_tflite.convert(source, prec, calib))
        else:
            m = convert_onnx.to_onnx(source, 17)
            if prec != "fp32":
                m = convert_onnx.quantize(m, prec, calib, [s.name for s in source.inputs])
            path.write_bytes(m.SerializeToString())
        out = work / "out.npz"
        r = run_worker(path, 1, bench, LatencyConfig(), eval_inputs=evals, eval_out=out)
        assert r["ok"], r
        with np.load(out) as npz:
            outs = [npz[k] for k in sorted(npz.files)]
        met = compare(outs, ref, labels)
        row = {"format": fmt, "precision": prec, "size": path.stat().st_size, "p50_ms": r["p50_ms"],
               "p99_ms": r["p99_ms"], "init_ms": r["init_ms"], "peak_rss_mb": r["peak_rss_mb"],
               "accuracy_drop_points": met.get("accuracy_drop_points"),
               "top1_agreement": met.get("top1_agreement"), "runtime": r["runtime"]}
        if prec == "fp32" and fmt == "tflite":
            base = row
        row["size_ratio"] = row["size"] / base["size"]
        row["latency_ratio"] = row["p50_ms"] / base["p50_ms"]
        rows.append(row)
        print(f"  {fmt:<6} {prec:<13} {row['size'] / 1e6:8.3f} MB  x{row['size_ratio']:.2f}  "
              f"p50 {row['p50_ms']:8.3f} ms  x{row['latency_ratio']:.2f}  "
              f"drop {row['accuracy_drop_points'] if row['accuracy_drop_points'] is not None else '-'}",
              flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks-build.json"))
    args = ap.parse_args()
    results: dict = {}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "toolkit.cli", "--help"], check=True, capture_output=True, cwd=ROOT)
    results["help_seconds"] = time.perf_counter() - t
    print(f"edgeship --help: {results['help_seconds']:.3f} s")

    from toolkit.examples import mobilenet_v2, write_digits
    from toolkit.build.ingest import load_source

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = write_digits(work / "digits")
        src = load_source(paths["model"])
        calib = [np.load(paths["calibration"])["image"]]
        with np.load(paths["validation"]) as v:
            val, labels = [v["image"]], v["y"]
        print("digits (8x8x1 CNN):")
        results["digits"] = variants(src, calib, val, labels, work, onnx=True)

        mn = mobilenet_v2()
        mn.save(work / "mobilenet_v2.keras")
        src = load_source(work / "mobilenet_v2.keras")
        rng = np.random.default_rng(0)
        images = rng.random((64, 224, 224, 3), dtype=np.float32) * 2 - 1
        print("MobileNetV2 224 (random weights):")
        results["mobilenet_v2"] = variants(src, [images[:48]], [images[48:]], None, work, onnx=True)

        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "toolkit.cli", "--home", str(work / "home"), "build",
                               str(paths["model"]), "-p", "rpi4-arm64", "-p", "rpi3-armv7", "-p",
                               "x86_64-onnx", "--validation", str(paths["validation"]), "--calibration",
                               str(paths["calibration"]), "-o", str(work / "dist")],
                              capture_output=True, text=True, cwd=ROOT)
        results["build_3_profiles_seconds"] = time.perf_counter() - t
        assert proc.returncode == 0, proc.stderr[-2000:]
        print(f"digits build for 3 profiles: {results['build_3_profiles_seconds']:.1f} s")
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
