"""Container benchmark: image sizes, and start to ready inside the agent container vs outside, same run.

    python bench/container_bench.py [--runs 5] [--out docs/benchmarks-container.json]

- Image sizes (Podman's): the Debian base, the agent image and its layers, the host-services image.
- Start to ready: from launching the agent (``podman run -d IMAGE …`` / ``python -m agent.cli run …``) to
  GET /v2/health/ready answering 200, for the same int8 bundle (digits, MobileNetV2 224), on this machine:
  * first boot: empty state, ``--install BUNDLE`` (verify, extract, golden replay, load, serve);
  * restart: the state of the first boot kept (a volume / a folder), no --install.
  Inside and outside runs alternate, so both see the same machine load; the page cache is warm for both
  (a "cold" start here is a new process or container, not a cold disk). Needs Podman (docs/containers.md).
- Podman's own share: ``podman run --rm -p … --entrypoint true IMAGE`` (start and exit of a no-op container).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import containers  # noqa: E402  (tests/containers.py: the Podman helpers the container tests use)
from mosquitto import free_port  # noqa: E402


def bundles(work: Path) -> dict[str, Path]:
    """int8 rpi4-arm64 bundles of the digits CNN and MobileNetV2 224, made with `edgeship build`."""
    from toolkit.examples import mobilenet_v2, write_digits

    digits = write_digits(work / "digits")
    model = mobilenet_v2()
    model.save(work / "mobilenet-v2.keras")
    calib = np.random.default_rng(1).uniform(-1, 1, (32, 224, 224, 3)).astype(np.float32)
    np.savez(work / "mobilenet-v2.npz", **{model.input_names[0]: calib})
    sources = {"digits": (digits["model"], digits["validation"]),
               "mobilenet-v2": (work / "mobilenet-v2.keras", work / "mobilenet-v2.npz")}
    for name, (src, val) in sources.items():
        subprocess.run([sys.executable, "-m", "toolkit.cli", "--home", str(work), "build", str(src), "-p", "rpi4-arm64",
                        "--validation", str(val), "--variant", "int8", "--name", name, "--quick", "-o",
                        str(work / "dist")], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return {name: work / "dist" / f"{name}-v1-rpi4-arm64.bundle" for name in sources}


def layer_sizes(image: str) -> list[dict]:
    rows = containers.podman("history", "--format", "{{.Size}}\t{{.CreatedBy}}", image).stdout.splitlines()
    return [{"size": r.split("\t")[0], "step": r.split("\t")[1][:90]} for r in rows if not r.startswith("0 B")]


def inside(image: str, keys: Path, bundle_dir: Path, bundle: str | None, volume: str) -> float:
    port = free_port()
    args = ["--install", f"/bundles/{bundle}"] if bundle else []
    c = containers.Container(image, *args, ports={port: 8080}, environment={"EDGESHIP_AGENT_ARCH": "aarch64"},
                             volumes={keys: "/etc/edgeship/keys:ro", bundle_dir: "/bundles:ro",
                                      volume: "/var/lib/edgeship"})
    try:
        return containers.wait_ready(port, c)
    finally:
        c.remove()


def noop(image: str) -> float:
    """A container that does nothing, with the same port mapping: Podman's own share of a start."""
    t0 = time.perf_counter()
    containers.podman("run", "--rm", "-p", f"127.0.0.1:{free_port()}:8080", "--entrypoint", "true", image)
    return time.perf_counter() - t0


def outside(keys: Path, bundle: Path | None, state: Path) -> float:
    port = free_port()
    cmd = [sys.executable, "-m", "agent.cli", "run", "--state-dir", str(state), "--keyring", str(keys),
           "--port", str(port)] + (["--install", str(bundle)] if bundle else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "EDGESHIP_AGENT_ARCH": "aarch64"})
    try:
        containers.wait_ready(port)
        return time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks-container.json"))
    args = ap.parse_args()
    why = containers.unavailable()
    if why:
        sys.exit(f"container_bench: {why}")
    if not containers.has_image("localhost/edgeship-base:bookworm-amd64"):
        containers.build("base")
    agent_image, host_image = containers.build("agent"), containers.build("host")
    out: dict = {"machine": f"{platform.machine()}, {platform.python_version()}, podman "
                 + containers.podman("--version").stdout.split()[-1]}
    out["images_mb"] = {name: round(containers.image_size(img) / 1e6, 1) for name, img in (
        ("debian_base", "localhost/edgeship-base:bookworm-amd64"), ("agent", agent_image), ("host", host_image))}
    out["agent_layers"] = layer_sizes(agent_image)
    print(json.dumps(out, indent=1))
    with tempfile.TemporaryDirectory(prefix="edgeship-cbench-") as tmp:
        work = Path(tmp)
        found = bundles(work)
        keys, bdir = work / "pub", work / "bundles"
        keys.mkdir()
        bdir.mkdir()
        shutil.copy(work / "keys" / "signing.pub", keys / "signing.pub")
        for b in found.values():
            shutil.copy(b, bdir / b.name)
        for d in (keys, bdir, *keys.iterdir(), *bdir.iterdir()):
            d.chmod(0o755 if d.is_dir() else 0o644)
        out["start_to_ready_s"] = {}
        for name, b in found.items():
            res: dict[str, list[float]] = {k: [] for k in ("inside_first", "outside_first", "inside_restart",
                                                           "outside_restart", "noop_container")}
            for i in range(args.runs):
                vol, state = f"edgeship-cbench-{uuid.uuid4().hex[:8]}", work / f"state-{name}-{i}"
                try:
                    res["inside_first"].append(inside(agent_image, keys, bdir, b.name, vol))
                    res["outside_first"].append(outside(keys, bdir / b.name, state))
                    res["inside_restart"].append(inside(agent_image, keys, bdir, None, vol))
                    res["outside_restart"].append(outside(keys, None, state))
                    res["noop_container"].append(noop(agent_image))
                finally:
                    containers.podman("volume", "rm", "-f", vol, check=False)
            med = {k: statistics.median(v) for k, v in res.items()}
            out["start_to_ready_s"][name] = {
                **{k: round(v, 3) for k, v in med.items()},
                "ratio_first": round(med["inside_first"] / med["outside_first"], 2),
                "ratio_restart": round(med["inside_restart"] / med["outside_restart"], 2),
                "runs": args.runs, "raw": {k: [round(x, 3) for x in v] for k, v in res.items()}}
            print(name, json.dumps(out["start_to_ready_s"][name]))
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
