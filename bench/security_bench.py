"""Security benchmark: what identities and encryption cost, measured in one run.

    python bench/security_bench.py [--out docs/benchmarks-security.json] [--devices 500]

- Enrolling N devices (`edgeship device enroll`'s function, in one process): fleet CA certificate + P-256
  key, X25519 model key, the device folder (8 files, fsynced, renamed into place), the identity register;
  plus the same through the CLI, one process per device (what a shell loop costs), on a few devices.
- Install time of a 4 MB bundle (an ONNX model with a 1000x1000 float32 weight) encrypted vs plain, on the
  agent's install engine (Verify, Stage, VerifyModel, Commit, Cleanup), each into a fresh state dir,
  interleaved, median of R runs: the ratio and the time decryption itself takes.
- Wire bytes and seal time of that bundle: sealed size / plain size; and of a "head-only" update of it (the
  last 10 of 1000 output columns retrained): the unencrypted delta patch vs the encrypted (zstd-sealed) one,
  as the publisher makes them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def enroll_bench(work: Path, n: int, cli_n: int) -> dict:
    from toolkit.enroll import ca_of, enroll
    from toolkit.settings import Settings
    from toolkit.signing import generate_key

    s = Settings(work / "home")
    generate_key(s.key_path)
    ca = ca_of(s)  # the CA is made once, before the clock starts
    t0 = time.perf_counter()
    for i in range(n):
        enroll(s, ca, f"pi-{i:04d}", f"g{i % 10}", "default", "mqtts://broker.example.com:8883",
               work / "devices" / f"pi-{i:04d}")
    total = time.perf_counter() - t0
    ca.close()
    per_cli = []
    for i in range(cli_n):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "toolkit.cli", "--home", str(s.home), "device", "enroll",
                        f"cli-{i}", "--group", "g", "--broker", "mqtts://b:8883", "-o",
                        str(work / "devices" / f"cli-{i}")], check=True, capture_output=True, cwd=ROOT)
        per_cli.append(time.perf_counter() - t)
    return {"devices": n, "total_s": round(total, 2), "per_device_ms": round(total / n * 1e3, 2),
            "cli_per_device_s": round(statistics.median(per_cli), 3), "cli_runs": cli_n}


def install_bench(work: Path, runs: int) -> dict:
    from onnx import helper, numpy_helper

    import tarfile

    from agent.keys import Keyring
    from agent.seal import Opener, Sealing, decrypt_stream, generate_model_key, model_key_id
    from agent.serve.service import Agent
    from modelkit import make_bundle, onnx_model
    from toolkit.fleet.sealing import seal_bundle
    from toolkit.signing import generate_key

    key = generate_key(work / "keys" / "signing.pem")
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((1000, 1000)).astype(np.float32), "w")
    model = onnx_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", "float32", [-1, 1000])],
                       [("y", "float32", [-1, 1000])], [w])
    plain = make_bundle(work / "plain.bundle", key, model, {"x": np.ones((1, 1000), np.float32)}, name="big")
    pem, pub = generate_model_key()
    (work / "model.key").write_bytes(pem)
    t = time.perf_counter()
    sealed = seal_bundle(plain, {model_key_id(pub): pub}, key, work / "sealed")
    seal_s = time.perf_counter() - t
    keyring, opener = Keyring.of(key.public_raw), Opener.load(work / "model.key")
    times: dict[str, list[float]] = {"plain": [], "sealed": []}
    for i in range(runs):
        for kind, bundle in (("plain", plain), ("sealed", sealed.path)):
            state = work / f"st-{kind}-{i}"
            a = Agent(state, keyring, "x86_64", opener=opener)
            a.start()
            t = time.perf_counter()
            res = a.install(bundle)
            times[kind].append(time.perf_counter() - t)
            assert res.status == "installed", res
            shutil.rmtree(state)
    with tarfile.open(sealed.path) as tar:  # decryption alone: the sealed model file, segment by segment
        s = Sealing.of(json.loads(tar.extractfile("manifest.json").read()))
        data_key = opener.data_key(s, "bench")
        prefix, size = s.files["model.onnx"]
        t = time.perf_counter()
        for _ in decrypt_stream(tar.extractfile("model.onnx"), size, data_key, prefix, b"model.onnx", s.segment,
                                "bench"):
            pass
        decrypt_s = time.perf_counter() - t
    p, q = statistics.median(times["plain"]), statistics.median(times["sealed"])
    wire = delta_bytes(work, key, w, plain, {model_key_id(pub): pub})
    return {"delta": wire,"bundle_bytes": plain.stat().st_size, "sealed_bytes": sealed.path.stat().st_size,
            "size_ratio": round(sealed.path.stat().st_size / plain.stat().st_size, 5), "runs": runs,
            "install_plain_ms": round(p * 1e3, 1), "install_sealed_ms": round(q * 1e3, 1),
            "install_ratio": round(q / p, 3), "decrypt_model_ms": round(decrypt_s * 1e3, 1),
            "seal_ms": round(seal_s * 1e3, 1),
            "install_plain_all_ms": [round(x * 1e3, 1) for x in times["plain"]],
            "install_sealed_all_ms": [round(x * 1e3, 1) for x in times["sealed"]]}


def delta_bytes(work: Path, key, w, plain: Path, recipients: dict) -> dict:
    """v2 = v1 with the last 10 output columns of its weight changed: plain delta vs sealed delta."""
    from onnx import helper, numpy_helper

    from agent.fleet import delta
    from modelkit import make_bundle, onnx_model
    from toolkit.fleet.publish import base_content
    from toolkit.fleet.sealing import seal_bundle

    w2 = numpy_helper.to_array(w).copy()
    w2[:, -10:] = np.random.default_rng(1).standard_normal((1000, 10))
    model = onnx_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", "float32", [-1, 1000])],
                       [("y", "float32", [-1, 1000])], [numpy_helper.from_array(w2, "w")])
    v2 = make_bundle(work / "v2.bundle", key, model, {"x": np.ones((1, 1000), np.float32)}, name="big", version=2)
    base = base_content(plain)
    clear = delta.make_patch(base, v2.read_bytes())["patch"]
    sealed = seal_bundle(v2, recipients, key, work / "sealed-v2")
    enc = delta.make_sealed_patch(base, sealed.path.read_bytes(), sealed.manifest, sealed.signature,
                                  sealed.payload, sealed.data_key)["patch"]
    return {"bundle_bytes": v2.stat().st_size, "plain_delta_bytes": len(clear), "sealed_delta_bytes": len(enc),
            "sealed_vs_plain_delta": round(len(enc) / len(clear), 3),
            "sealed_delta_vs_full_bundle": round(len(enc) / sealed.path.stat().st_size, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks-security.json")
    ap.add_argument("--devices", type=int, default=500)
    ap.add_argument("--cli-devices", type=int, default=5)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgeship-secbench-"))
    try:
        out = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
               "enroll": enroll_bench(work / "enroll", args.devices, args.cli_devices),
               "install_4mb": install_bench(work / "install", args.runs)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
