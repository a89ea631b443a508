"""The agent container image, built and run for real with Podman from a Debian base (deploy/container/).

Part of the default run where Podman is (`.ci/run` installs it); skipped, saying why, where it is missing.
`python -m pytest -m container` runs only these.
"""

from __future__ import annotations

import shutil
import uuid

import numpy as np
import pytest

import containers
from mosquitto import free_port

pytestmark = pytest.mark.container


@pytest.fixture(scope="session")
def podman_ready(request):
    why = containers.unavailable()
    if why:
        pytest.skip(why)
    if not containers.has_image("localhost/edgeship-base:bookworm-amd64"):
        try:
            containers.build("base")
        except RuntimeError as exc:  # mmdebstrap needs the Debian mirror once; .ci/run builds it
            pytest.skip(f"cannot build the Debian base image here: {exc}")


@pytest.fixture(scope="session")
def agent_image(podman_ready):
    return containers.build("agent", tag="localhost/edgeship-agent:test")


@pytest.fixture()
def mounts(tmp_path, signing_key, digits_build):
    """A keyring folder with only the public key, and a folder of bundles, readable by the image's user."""
    keys, bundles = tmp_path / "keys", tmp_path / "bundles"
    keys.mkdir()
    bundles.mkdir()
    (keys / "signing.pub").write_bytes(signing_key.path.with_suffix(".pub").read_bytes())
    for p in digits_build.profiles:
        shutil.copy(p.bundle, bundles / p.bundle.name)
    for d in (keys, bundles):
        d.chmod(0o755)
        for f in d.iterdir():
            f.chmod(0o644)
    return keys, bundles


def _python_api(bundle, keyring, x, tmp_path):
    from agent.bundle import extract_bundle
    from agent.runtime import load_model

    m = extract_bundle(bundle, keyring, tmp_path / "extracted")
    return load_model(tmp_path / "extracted" / m.model_file, threads=1).predict(x)


@pytest.mark.parametrize("target", ["rpi4-arm64", "x86_64-onnx"])
def test_agent_image_installs_a_bundle_and_answers_v2(agent_image, mounts, digits_build, digits, keyring,
                                                      tmp_path, target):
    keys, bundles = mounts
    bundle = next(p.bundle for p in digits_build.profiles if p.profile.name == target)
    arch = "aarch64" if target == "rpi4-arm64" else "x86_64"  # a Raspberry Pi 4's agent, on this CPU
    port, volume = free_port(), f"edgeship-test-{uuid.uuid4().hex[:8]}"
    try:
        with containers.Container(agent_image, "--install", f"/bundles/{bundle.name}", ports={port: 8080},
                                  volumes={keys: "/etc/edgeship/keys:ro", bundles: "/bundles:ro",
                                           volume: "/var/lib/edgeship"},
                                  environment={"EDGESHIP_AGENT_ARCH": arch}) as c:
            containers.wait_ready(port, c)
            status, meta = containers.http_json(port, "GET", "/v2/models/digits")
            assert status == 200 and meta["versions"] == ["1"]
            with np.load(digits["validation"]) as npz:
                x = npz["image"][:5].astype(np.float32)
            status, res = containers.http_json(port, "POST", "/v2/models/digits/infer", {
                "id": "c1", "inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                                        "data": x.ravel().tolist()}]})
            assert status == 200, res
            assert res["model_version"] == "1" and res["id"] == "c1"
            want = _python_api(bundle, keyring, x, tmp_path)
            (out,) = res["outputs"]
            got = np.asarray(out["data"], np.float32).reshape(out["shape"])
            np.testing.assert_allclose(got, want[out["name"]], rtol=1e-5, atol=1e-6)
            assert c.exec("id", "-u").stdout.strip() == "10001"  # not root
        # the state lives in the volume: a new container serves the installed model with no --install
        with containers.Container(agent_image, ports={port: 8080}, volumes={keys: "/etc/edgeship/keys:ro",
                                  volume: "/var/lib/edgeship"}, environment={"EDGESHIP_AGENT_ARCH": arch}) as c:
            containers.wait_ready(port, c)
            assert containers.http_json(port, "GET", "/v2/models/digits")[1]["versions"] == ["1"]
    finally:
        containers.podman("volume", "rm", "-f", volume, check=False)


@pytest.fixture(scope="session")
def host_image(podman_ready):
    return containers.build("host", tag="localhost/edgeship-host:test")


def test_compose_stack_broker_collector_agents_and_rollout(agent_image, host_image, mounts, digits_build,
                                                           signing_key, settings, tmp_path):
    """deploy/container/compose.yaml with podman-compose: Mosquitto with accounts and ACL, the collector,
    two agents; v1 published from this machine, v2 rolled out by the rollout driver in its container."""
    import json
    import subprocess
    import sys
    import time

    from test_install import rebundle

    if shutil.which("podman-compose") is None:
        pytest.skip("podman-compose not installed (apt-get install podman-compose; .ci/run does)")
    keys, _ = mounts
    dist = tmp_path / "dist"
    dist.mkdir()
    v1 = next(p.bundle for p in digits_build.profiles if p.profile.name == "x86_64-onnx")
    v2 = rebundle(v1, dist / "digits-v2-x86_64-onnx.bundle", signing_key, version=2)
    dist.chmod(0o755)
    v2.chmod(0o644)
    (tmp_path / "passwords").write_text("edgeship-host:host-pw\nagent-1:a1-pw\nagent-2:a2-pw\n")
    (tmp_path / "passwords").chmod(0o644)
    mqtt, a1, a2 = free_port(), free_port(), free_port()
    project = f"edgeship-test-{uuid.uuid4().hex[:8]}"
    env = {**containers.env(), "EDGESHIP_HOST_IMAGE": host_image, "EDGESHIP_AGENT_IMAGE": agent_image,
           "EDGESHIP_KEYRING": str(keys), "EDGESHIP_MQTT_PASSWORDS": str(tmp_path / "passwords"),
           "EDGESHIP_HOST_PASSWORD": "host-pw", "AGENT_1_PASSWORD": "a1-pw", "AGENT_2_PASSWORD": "a2-pw",
           "EDGESHIP_DIST": str(dist), "EDGESHIP_SIGNING_KEY": str(signing_key.path),
           "EDGESHIP_MQTT_PUBLISH": f"127.0.0.1:{mqtt}", "AGENT_1_PUBLISH": f"127.0.0.1:{a1}",
           "AGENT_2_PUBLISH": f"127.0.0.1:{a2}"}
    signing_key.path.chmod(0o644)  # read by the rollout driver's unprivileged user (a test key)
    compose = ["podman-compose", "-p", project, "-f", str(containers.ROOT / "deploy/container/compose.yaml")]

    def run(*args, timeout=300):
        res = subprocess.run(compose + list(args), capture_output=True, text=True, env=env, timeout=timeout)
        assert res.returncode == 0, f"{args}: {res.stdout[-2000:]}{res.stderr[-2000:]}"
        return res

    def versions():
        out = {}
        for port in (a1, a2):
            try:
                out[port] = containers.http_json(port, "GET", "/v2/models/digits")[1].get("versions")
            except (OSError, ValueError):
                out[port] = None
        return out

    def wait(pred, what, timeout=120):
        end = time.time() + timeout
        while time.time() < end:
            if pred():
                return
            time.sleep(0.5)
        logs = subprocess.run(compose + ["logs"], capture_output=True, text=True, env=env).stdout[-4000:]
        raise AssertionError(f"timed out waiting for {what}:\n{logs}")

    try:
        run("up", "-d", "broker", "collector", "agent-1", "agent-2")
        for port in (a1, a2):  # no model yet: live, not ready
            containers.wait_ready(port, path="/v2/health/live")
        pub = subprocess.run([sys.executable, "-m", "toolkit.cli", "--home", str(settings.home), "publish", str(v1),
                              "--group", "compose", "--broker", f"mqtt://127.0.0.1:{mqtt}", "--username",
                              "edgeship-host", "--password", "host-pw", "--key", str(signing_key.path)],
                             capture_output=True, text=True, timeout=120)
        assert pub.returncode == 0, pub.stderr
        wait(lambda: versions() == {a1: ["1"], a2: ["1"]}, "v1 on both agents")
        res = run("run", "--rm", "rollout", "rollout", "start", f"/dist/{v2.name}", "--group", "compose",
                  "--canary", "50%", "--timeout", "120")
        assert "completed" in res.stdout, res.stdout
        wait(lambda: versions() == {a1: ["2"], a2: ["2"]}, "v2 on both agents")

        def fleet_status():
            out = subprocess.run(["podman", "exec", f"{project}_collector_1", "edgeship", "fleet", "status", "--json"],
                                 capture_output=True, text=True, env=env)
            return {d["device"]: d for d in json.loads(out.stdout or "[]")} if out.returncode == 0 else {}

        wait(lambda: {d: s.get("version") for d, s in fleet_status().items()} == {"agent-1": 2, "agent-2": 2},
             "the collector to see both agents on v2")
        # a wrong password is refused by the broker (accounts and ACL are in force)
        bad = subprocess.run([sys.executable, "-m", "toolkit.cli", "--home", str(settings.home), "fleet", "devices",
                              "--broker", f"mqtt://127.0.0.1:{mqtt}", "--username", "agent-1", "--password", "nope"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0
    finally:
        subprocess.run(compose + ["down", "-v"], capture_output=True, env=env, timeout=300)


PI4_CPUINFO = "".join(f"processor\t: {i}\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
                      f"CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n"
                      for i in range(4)) + "Model\t\t: Raspberry Pi 4 Model B Rev 1.4\n"


def test_arm64_agent_image_builds_without_emulation_and_runs_under_qemu(podman_ready, digits_build, digits,
                                                                        keyring, mounts, tmp_path):
    """The arm64 image is built on this x86_64 machine with no RUN step (so no emulation), from an arm64
    Debian base extracted by mmdebstrap; its file system then runs a Raspberry Pi 4 bundle under qemu-user
    like the device would, and answers what the Python API answers here."""
    import subprocess

    qemu = shutil.which("qemu-aarch64-static")
    if qemu is None:
        pytest.skip("qemu-user-static not installed (apt-get install qemu-user-static; .ci/run does)")
    try:
        containers.build("base", arch="arm64")
    except RuntimeError as exc:
        pytest.skip(f"cannot build the arm64 Debian base here: {exc}")
    image = containers.build("agent", arch="arm64", tag="localhost/edgeship-agent:test-arm64")
    assert containers.podman("image", "inspect", "--format", "{{.Architecture}}", image).stdout.strip() == "arm64"
    root = containers.export(image, tmp_path / "root")
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc" / "cpuinfo").write_text(PI4_CPUINFO)  # qemu passes the x86 one through: LiteRT would crash
    keys, _ = mounts
    bundle = next(p.bundle for p in digits_build.profiles if p.profile.name == "rpi4-arm64")
    with np.load(digits["validation"]) as npz:
        x = npz["image"][:5].astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    env = {"QEMU_CPU": "cortex-a72", "PYTHONPATH": "/opt/edgeship/app:/opt/edgeship/deps", "PATH": "/usr/bin"}

    def agent(*args):
        res = subprocess.run([qemu, "-L", str(root), str(root / "usr/bin/python3"), "-P", "-m", "agent.cli", *args],
                             capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout

    assert "golden max |error|" in agent("verify", str(bundle), "--keyring", str(keys))
    import json

    got = json.loads(agent("predict", str(bundle), "--keyring", str(keys), "--input", str(tmp_path / "x.npy")))
    want = _python_api(bundle, keyring, x, tmp_path)
    (name, out), = got["outputs"].items()
    np.testing.assert_allclose(np.asarray(out, np.float32), want[name], atol=1e-2)
    assert (np.asarray(out).argmax(1) == want[name].argmax(1)).all()
