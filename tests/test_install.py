"""The crash-safe install engine: table-driven crash and error tests, every refusal, hot swap."""

from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import write_bundle
from agent.keys import Keyring
from agent.serve.service import Agent
from agentproc import AgentProcess, agent_cmd, run_cli
from conftest import DEVICE_ARCH, DEVICE_PROFILE, ROOT, device_bundle

pytestmark = pytest.mark.device


def rebundle(src: Path, dst: Path, key, **changes) -> Path:
    """Re-sign an existing bundle with manifest changes (files=... replaces file contents)."""
    files_override = changes.pop("files", {})
    with tarfile.open(src) as tar:
        doc = json.loads(tar.extractfile("manifest.json").read())
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()
                 if m.name not in ("manifest.json", "manifest.sig")}
    files.update(files_override)
    doc.update(changes)
    doc.pop("files", None)
    write_bundle(dst, doc, files, key.sign, key.key_id)
    return dst


def rewrite_outputs(golden: bytes, fn) -> bytes:
    """golden.npz with each reference output array replaced by ``fn(array)`` (the .npy bytes to store)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(golden)) as zin, zipfile.ZipFile(buf, "w") as zout:
        for info in zin.infolist():
            content = zin.read(info)
            if info.filename.startswith("out."):
                content = fn(np.lib.format.read_array(io.BytesIO(content)))
            zout.writestr(info, content)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bundles(digits_build, signing_key, tmp_path_factory):
    d = tmp_path_factory.mktemp("bundles")
    v1 = device_bundle(digits_build)
    return {"v1": v1, "v2": rebundle(v1, d / "v2.bundle", signing_key, version=2),
            "v3": rebundle(v1, d / "v3.bundle", signing_key, version=3), "dir": d}


@pytest.fixture()
def keyring_dir(settings, signing_key):
    return settings.keyring_path


def make_agent(tmp_path, keyring, **kw) -> Agent:
    a = Agent(tmp_path / "state", keyring, DEVICE_ARCH, **kw)
    a.start()
    return a


X = np.random.default_rng(0).random((3, 8, 8, 1), np.float32)


def serving_version(state: Path, keyring: Keyring) -> int:
    a = Agent(state, keyring, DEVICE_ARCH)
    a.start()
    assert a.current is not None, "agent came back serving nothing"
    assert a.predict(X)["probs"].shape == (3, 10)
    return a.current.manifest.version


def test_install_commit_and_rollback(tmp_path, keyring, bundles):
    a = make_agent(tmp_path, keyring)
    r = a.install(bundles["v1"])
    assert r.ok and r.chain == ["Verify", "Stage", "VerifyModel", "Commit", "Cleanup"]
    r = a.install(bundles["v2"])
    assert r.status == "installed" and a.current.manifest.version == 2
    assert a.install(bundles["v2"]).status == "nothing-to-do"
    assert a.rollback().startswith("digits-v1") and a.current.manifest.version == 1
    slots = sorted(p.name for p in (tmp_path / "state" / "slots").iterdir())
    assert len(slots) == 2  # active and previous, side by side


@pytest.mark.parametrize("state, expect", [
    ("Stage", 1), ("VerifyModel", 1), ("Commit", 1), ("Cleanup", 2), ("Rollback", 1), ("Failure", 1),
])
def test_killed_in_state(tmp_path, keyring, keyring_dir, bundles, state, expect):
    """kill -9 the agent in each persisted state, 3 times, then restart: old or new, never nothing."""
    st = tmp_path / "state"
    a = make_agent(tmp_path, keyring)
    assert a.install(bundles["v1"]).ok
    faults = f"{state}=crash" + (",VerifyModel=error" if state in ("Rollback", "Failure") else "")
    for _ in range(3):
        proc = subprocess.run(agent_cmd("install", bundles["v2"], "--state-dir", st, "--keyring", keyring_dir,
                                        "--arch", DEVICE_ARCH, faults=faults),
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == -9, proc.stderr[-2000:]
        assert json.loads((st / "state.json").read_text())["update"]["state"] == state
        assert serving_version(st, keyring) == expect  # restart: recovery runs, a model serves
        doc = json.loads((st / "state.json").read_text())
        assert doc["update"] is None
        if expect == 1:
            assert doc["last_update"]["outcome"] == "failed"
            assert not [p for p in (st / "slots").iterdir() if "-v2-" in p.name]
        else:
            break  # v2 is installed; re-installing is nothing-to-do


@pytest.mark.parametrize("state, expect", [("Stage", 1), ("VerifyModel", 1), ("Commit", 1), ("Cleanup", 2)])
def test_killed_during_a_control_channel_install(tmp_path, keyring_dir, bundles, state, expect):
    """`edgeship-agent install` beside a running agent: the agent process is the one killed (in STATE); the
    CLI says so instead of hanging, and the restarted agent serves v1 or v2 and says which."""
    st = tmp_path / "state"
    assert run_cli("install", bundles["v1"], "--state-dir", st, "--keyring", keyring_dir).returncode == 0
    agent = AgentProcess(st, keyring_dir, tmp_path / "agent.log", faults=f"{state}=crash").start().wait_ready()
    try:
        res = run_cli("install", bundles["v2"], "--state-dir", st, "--keyring", keyring_dir)
        assert res.returncode == 1 and "closed the connection without answering" in res.stderr, res
        assert agent.proc.wait(30) == -9
        agent = AgentProcess(st, keyring_dir, tmp_path / "agent.log").start().wait_ready()
        assert agent.answer() == f"digits@{expect}"
        status = json.loads(run_cli("status", "--state-dir", st, "--keyring", keyring_dir).stdout)
        assert status["version"] == expect and status["update"] is None and status["agent"]["running"]
        assert len(list((st / "slots").iterdir())) == expect  # v1 only, or v2 with v1 as previous
    finally:
        agent.stop()


def test_leftovers_of_killed_writes_are_swept_at_start(tmp_path, keyring_dir, bundles):
    """What a SIGKILL during an atomic write or an extraction leaves (temp files named by mkstemp/mkdtemp,
    a half slot), and a slot no state refers to, are removed by the next owner; nothing else is."""
    st = tmp_path / "state"
    assert run_cli("install", bundles["v1"], "--state-dir", st, "--keyring", keyring_dir).returncode == 0
    before = sorted(p.name for p in st.iterdir())
    planted = [st / ".state.json.a1b2c3d4", st / ".fleet.json.zz_9y8x7", st / "slots" / ".digits-v2-0123456789ab.k3j4h5g6",
               st / "slots" / "digits-v9-deadbeefdead"]
    for p in planted[:2]:
        p.write_text("{ torn")
    for p in planted[2:]:
        p.mkdir()
        (p / "model.tflite").write_bytes(b"partial")
    agent = AgentProcess(st, keyring_dir, tmp_path / "agent.log").start().wait_ready()
    try:
        assert not [p for p in planted if p.exists()]
        assert sorted(p.name for p in st.iterdir()) == sorted(before + ["agent.sock"])
        assert agent.answer() == "digits@1"
    finally:
        agent.stop()


@pytest.mark.parametrize("state", ["Stage", "VerifyModel", "Commit"])
def test_error_in_state_rolls_back(tmp_path, keyring, bundles, state):
    a = make_agent(tmp_path, keyring, faults={state: "error"})
    a.engine.faults = {}
    assert a.install(bundles["v1"]).ok
    a.engine.faults = {state: "error"}
    r = a.install(bundles["v2"])
    upto = ["Verify", "Stage", "VerifyModel", "Commit"]
    assert r.chain == upto[:upto.index(state) + 1] + ["Rollback", "Failure", "Cleanup"]
    assert r.status == "rolled-back" and f"injected error in {state}" in r.reason
    assert a.current.manifest.version == 1 and a.predict(X)["probs"].shape == (3, 10)


def test_crash_loop_is_stopped(tmp_path, keyring, bundles):
    from agent.install import MAX_SAVES

    a = make_agent(tmp_path, keyring)
    assert a.install(bundles["v1"]).ok
    st = a.store.load()
    st["update"] = {"bundle": str(bundles["v2"]), "state": "Stage", "saves": MAX_SAVES, "slot": "x",
                    "from": st["active"], "allow_downgrade": False}
    a.store.save(st)
    b = make_agent(tmp_path, keyring)
    assert b.store.load()["update"] is None and "crash loop" in b.store.load()["last_update"]["error"]
    assert b.current.manifest.version == 1


def _refusal_cases(bundles, key, tmp):
    from agent.keys import key_id
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives import serialization

    v2 = bundles["v2"]
    data = v2.read_bytes()
    cases = {}
    p = tmp / "flipped.bundle"
    b = bytearray(data)
    b[len(b) // 2] ^= 1
    p.write_bytes(bytes(b))
    cases["hash mismatch"] = (p, "hash or size mismatch|not canonical|altered")
    p = tmp / "truncated.bundle"
    p.write_bytes(data[: len(data) // 2])
    cases["truncated"] = (p, "truncated|not a readable")
    other = Ed25519PrivateKey.generate()
    raw = other.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    from types import SimpleNamespace

    unknown = SimpleNamespace(sign=other.sign, key_id=key_id(raw))
    cases["unknown key"] = (rebundle(v2, tmp / "unknown.bundle", unknown), "does not trust")
    forged = SimpleNamespace(sign=other.sign, key_id=key.key_id)
    cases["bad signature"] = (rebundle(v2, tmp / "forged.bundle", forged), "signature does not match")
    other = "x86_64" if DEVICE_ARCH != "x86_64" else "armv7l"
    cases["wrong arch"] = (rebundle(v2, tmp / "arch.bundle", key, arch=other), f"built for {other}")
    cases["downgrade"] = (rebundle(v2, tmp / "old.bundle", key, version=1, name="digits"),
                          "older than .* installed before \\(anti-rollback\\)|same version")
    cases["model fails to load"] = (rebundle(v2, tmp / "garbage.bundle", key, version=4,
                                             files={"model.tflite": b"TFL3 not a model"}), "could not load")
    with tarfile.open(v2) as tar:
        golden = tar.extractfile("golden.npz").read()

    def rolled(arr: np.ndarray) -> bytes:
        out = io.BytesIO()
        np.lib.format.write_array(out, np.roll(arr, 1, axis=1))
        return out.getvalue()

    cases["golden mismatch"] = (rebundle(v2, tmp / "golden.bundle", key, version=5,
                                         files={"golden.npz": rewrite_outputs(golden, rolled)}),
                                "differs from the golden set")
    evil = tmp / "escape.bundle"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../../etc/evil")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    cases["tar escape"] = (evil, "unsafe or duplicate entry name")
    return cases


def test_every_refusal_keeps_the_running_model(tmp_path, keyring, bundles, signing_key):
    a = make_agent(tmp_path, keyring)
    assert a.install(bundles["v2"]).ok
    for name, (bundle, match) in _refusal_cases(bundles, signing_key, tmp_path).items():
        r = a.install(bundle)
        assert not r.ok, name
        assert re.search(match, r.reason), (name, r.reason)
        assert a.current.manifest.version == 2, name
        assert a.predict(X)["probs"].shape == (3, 10)
        doc = a.store.load()
        assert doc["update"] is None and doc["last_update"]["error"] == r.reason
        assert len(list((tmp_path / "state" / "slots").iterdir())) == 1, name
    assert not (tmp_path / "etc").exists()


def test_hot_swap_has_zero_failed_requests(tmp_path, keyring, bundles):
    a = make_agent(tmp_path, keyring)
    assert a.install(bundles["v1"]).ok
    seen, failures, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                cur = a.current
                a.predict(X)
                seen.append(cur.manifest.version)
            except Exception as exc:  # noqa: BLE001 - any failure counts
                failures.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        assert a.install(bundles["v2"]).ok
        assert a.install(bundles["v3"]).ok
    finally:
        import time

        time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert {1, 3} <= set(seen) and len(seen) > 50
    assert a.current.manifest.version == 3


def test_refused_what_the_device_does_not_have(tmp_path, keyring, bundles, signing_key):
    """The manifest's profile, runtime (name and min_version), NumPy constraint and delegate are checked
    against what is really installed here (no libedgetpu anywhere; no runtime module named no_such_module)."""
    from agent.bundle import Limits, inspect_bundle
    from agent.device import runtime

    a = Agent(tmp_path / "state", keyring, DEVICE_ARCH, profile=DEVICE_PROFILE)
    a.start()
    assert a.install(bundles["v1"]).ok
    rt = inspect_bundle(bundles["v1"])[0]["runtime"]
    have = runtime(rt["name"]).version
    other = "rpi5-arm64" if DEVICE_PROFILE != "rpi5-arm64" else "rpi4-arm64"
    cases = {
        "profile": ({"profile": other}, f"built for profile '{other}'; this device is configured as "
                                        f"'{DEVICE_PROFILE}'"),
        "min_version": ({"runtime": {**rt, "min_version": "99.0"}},
                        rf"needs {rt['name']} 99.0 or newer; this device has {have}"),
        "numpy": ({"runtime": {**rt, "numpy": f"<{np.__version__}"}},
                  rf"needs numpy <{np.__version__} \(runtime.numpy\); this device has numpy {np.__version__}"),
        "delegate": ({"runtime": {**rt, "delegate": "edgetpu"}}, r"needs the edgetpu delegate, but libedgetpu.so.1 cannot"),
    }
    for name, (change, match) in cases.items():
        r = a.install(rebundle(bundles["v1"], tmp_path / f"{name}.bundle", signing_key, version=2, **change))
        assert r.status == "refused" and r.chain == ["Verify", "Failure", "Cleanup"], (name, r)
        assert re.search(match, r.reason), (name, r.reason)
        assert a.current.manifest.version == 1
    ok = rebundle(bundles["v1"], tmp_path / "ok.bundle", signing_key, version=2,
                  runtime={**rt, "min_version": have, "numpy": ">=1.20,<99", "delegate": "xnnpack"})
    assert a.install(ok).status == "installed"
    import agent.runtime as rt_mod

    with pytest.MonkeyPatch.context() as mp:  # the runtime the bundle needs is not installed
        mp.setattr(rt_mod, "TFLITE_RUNTIMES", (("litert", "no_such_module_xyz", "pip install ai-edge-litert"),))
        r = a.install(rebundle(bundles["v1"], tmp_path / "rt.bundle", signing_key, version=2))
        assert r.status == "refused" and "which is not installed" in r.reason and "pip install" in r.reason, r.reason
    small = Agent(tmp_path / "state", keyring, DEVICE_ARCH, limits=Limits(max_file_bytes=1000))
    small.start()
    r = small.install(bundles["v3"])
    assert r.status == "refused" and "exceeds the size limit" in r.reason
    assert small.current.manifest.version == 2


def test_edgeship_agent_run_stays_light(tmp_path, digits_build, settings):
    """The modules a running agent (`edgeship-agent run`, serving HTTP) pulls in: no TensorFlow."""
    from conftest import run_py

    bundle = device_bundle(digits_build)
    code = f'''
import sys, threading, time, json, http.client
from click.testing import CliRunner
from agent.cli import cli
args = ["run", "--state-dir", {str(tmp_path / "st")!r}, "--keyring", {str(settings.keyring_path)!r},
        "--port", "0", "--install", {str(bundle)!r}]
import agent.serve.service
orig = agent.serve.service.Agent.start
started = []
def start(self):
    started.append(self); return orig(self)
agent.serve.service.Agent.start = start
res = []
t = threading.Thread(target=lambda: res.append(CliRunner().invoke(cli, args)), daemon=True); t.start()
for _ in range(200):
    if started and started[0].current is not None: break
    time.sleep(0.05)
assert started and started[0].current is not None, res and (res[0].output, res[0].exception)
import os  # CliRunner swapped sys.stdout for the running command: write to fd 1
os.write(1, (json.dumps(sorted({{m.split(".")[0] for m in sys.modules}})) + "\\n").encode())
'''
    mods = set(json.loads(run_py(code, EDGESHIP_AGENT_ARCH=DEVICE_ARCH).strip().splitlines()[-1]))
    assert mods & {"ai_edge_litert", "tflite_runtime"}
    assert not mods & {"tensorflow", "tf_keras", "tf2onnx", "toolkit", "keras", "onnx"}


def test_commit_reuses_the_model_verify_loaded(tmp_path, keyring, bundles, monkeypatch):
    """The model is loaded once per update: the hot swap takes the instance VerifyModel checked."""
    import agent.serve.service

    a = make_agent(tmp_path, keyring)

    def no_second_load(*args, **kwargs):
        raise AssertionError("model loaded a second time on commit")

    monkeypatch.setattr(agent.serve.service, "load_model", no_second_load)
    assert a.install(bundles["v1"]).ok
    assert a.current.manifest.version == 1 and a.predict(X)["probs"].shape == (3, 10)
