"""Podman for the container tests and benchmark: whether it can run here (and why not), images built with
deploy/container/build.sh, containers that are always removed."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "deploy" / "container" / "build.sh"
CACHE = Path(os.environ.get("EDGESHIP_CONTAINER_CACHE", Path.home() / ".cache" / "edgeship" / "containers"))


def env() -> dict[str, str]:
    """Podman's settings for this kind of machine (deploy/container/containers.conf), unless set already."""
    conf = CACHE / "containers.conf"
    if "CONTAINERS_CONF" not in os.environ and not conf.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "deploy" / "container" / "containers.conf", conf)
    return {"CONTAINERS_CONF": str(conf), **os.environ}


def unavailable() -> str | None:
    """Why containers cannot run here, or None."""
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} not installed (apt-get install podman runc mmdebstrap; .ci/run does)"
    res = subprocess.run(["podman", "info", "--format", "{{.Host.Arch}}"], capture_output=True, text=True,
                         env=env(), timeout=60)
    if res.returncode != 0:
        return f"podman does not work here: {res.stderr.strip()[-300:]}"
    return None


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    res = subprocess.run(["podman", *args], capture_output=True, text=True, env=env(), timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return res


def has_image(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def build(what: str, tag: str | None = None, arch: str | None = None, timeout: float = 1800) -> str:
    """``base``, ``agent`` or ``host`` for ``arch`` (amd64, arm64; default: this machine's); returns the image."""
    args = ["bash", str(BUILD), what] + (["--tag", tag] if tag else []) + (["--arch", arch] if arch else [])
    res = subprocess.run(args, capture_output=True, text=True, env=env(), timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"build.sh {what} failed ({res.returncode}):\n{res.stdout[-1000:]}{res.stderr[-3000:]}")
    return res.stdout.strip().splitlines()[-1]


def image_size(name: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", name).stdout.strip())


class Container:
    """``podman run -d`` that is always removed (``with Container(...) as c``)."""

    def __init__(self, image: str, *args: str, ports: dict[int, int] | None = None,
                 volumes: dict[Path, str] | None = None, environment: dict[str, str] | None = None,
                 network: str | None = None, name: str | None = None, entrypoint: str | None = None):
        self.name = name or f"edgeship-test-{uuid.uuid4().hex[:10]}"
        cmd = ["run", "-d", "--name", self.name]
        for host, inner in (ports or {}).items():
            cmd += ["-p", f"127.0.0.1:{host}:{inner}"]
        for src, dst in (volumes or {}).items():
            cmd += ["-v", f"{src}:{dst}"]
        for k, v in (environment or {}).items():
            cmd += ["-e", f"{k}={v}"]
        cmd += ["--network", network] if network else []
        cmd += ["--entrypoint", entrypoint] if entrypoint else []
        self.started = time.perf_counter()
        podman(*cmd, image, *args)

    def logs(self) -> str:
        res = podman("logs", self.name, check=False)
        return res.stdout + res.stderr

    def running(self) -> bool:
        res = podman("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return res.stdout.strip() == "true"

    def exec(self, *args: str) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *args, check=False)

    def remove(self) -> None:
        podman("rm", "-f", "-v", "-t", "5", self.name, check=False)  # -v: and its anonymous volumes

    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def wait_ready(port: int, container: Container | None = None, timeout: float = 120,
               path: str = "/v2/health/ready") -> float:
    """Poll GET ``path`` until 200; returns the seconds since ``container`` started (or since the call).
    Fails with the container's log when it exits or the deadline passes."""
    start = container.started if container else time.perf_counter()
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return time.perf_counter() - start
        except OSError:
            pass
        finally:
            conn.close()
        if container is not None and not container.running():
            raise RuntimeError(f"container {container.name} exited:\n{container.logs()[-3000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"not ready on port {port} after {timeout:.0f} s" +
                       (f":\n{container.logs()[-3000:]}" if container else ""))


def http_json(port: int, method: str, path: str, body: object = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        res = conn.getresponse()
        return res.status, json.loads(res.read() or b"{}")
    finally:
        conn.close()


def export(image: str, dest: Path) -> Path:
    """The image's file system, unpacked into ``dest`` (any architecture: nothing runs)."""
    cid = podman("create", image).stdout.strip()
    try:
        dest.mkdir(parents=True, exist_ok=True)
        data = subprocess.run(["podman", "export", cid], capture_output=True, env=env(), timeout=600, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=data, check=True, capture_output=True)
    finally:
        podman("rm", "-v", cid, check=False)  # -v: the anonymous volume of the image's VOLUME
    return dest
