"""One owner per state dir: `edgeship-agent run` holds its lock, and `install`, `rollback` and `status` run
beside it (real second processes) go through its control channel, so what it serves and what `status`
says agree. `status` never recovers or writes. Production `run` ignores the fault-injection variable."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agentproc import ROOT, AgentProcess, agent_env, run_cli
from test_install import bundles  # noqa: F401 (a fixture)


def _status(st, keyring) -> dict:
    res = run_cli("status", "--state-dir", st, "--keyring", keyring)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture()
def running(tmp_path, settings, bundles):  # noqa: F811
    """An agent process serving v2 (v1 kept as previous)."""
    st = tmp_path / "state"
    for v in ("v1", "v2"):
        assert run_cli("install", bundles[v], "--state-dir", st, "--keyring", settings.keyring_path).returncode == 0
    agent = AgentProcess(st, settings.keyring_path, tmp_path / "agent.log").start().wait_ready()
    yield agent
    agent.stop()


def test_rollback_install_and_status_beside_a_running_agent(running, settings, bundles):  # noqa: F811
    st, kr = running.state_dir, settings.keyring_path
    assert running.answer() == "digits@2"
    res = run_cli("rollback", "--state-dir", st, "--keyring", kr)
    assert res.returncode == 0 and res.stdout.startswith("active: digits-v1-"), res.stderr
    assert running.answer() == "digits@1"  # the service switched, not just the state file
    doc = _status(st, kr)
    assert doc["version"] == 1 and doc["agent"]["running"] and doc["agent"]["pid"] == running.proc.pid
    res = run_cli("install", bundles["v3"], "--state-dir", st, "--keyring", kr)
    assert res.returncode == 0 and res.stdout.startswith("installed: Verify -> Stage"), res.stdout + res.stderr
    assert running.answer() == "digits@3" and _status(st, kr)["version"] == 3
    res = run_cli("install", bundles["v1"], "--state-dir", st, "--keyring", kr)  # refusals come back too
    assert res.returncode == 1 and "anti-rollback" in res.stdout and running.answer() == "digits@3"
    assert running.proc.poll() is None


def test_one_owner_and_a_private_channel(running, settings, tmp_path):
    st, kr = running.state_dir, settings.keyring_path
    second = AgentProcess(st, settings.keyring_path, tmp_path / "second.log").start()
    try:
        assert second.proc.wait(60) == 1
    finally:
        second.kill()
    assert f"is in use by pid {running.proc.pid} (edgeship-agent run)" in (tmp_path / "second.log").read_text()
    sock = st / "agent.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    for payload, error in ((b"x" * (65 << 10) + b"\n", "exceeds 65536 bytes"), (b"not json\n", "bad request"),
                           (b'{"op": "format-disk"}\n', "unknown request 'format-disk'"),
                           (b'{"op": "install", "bundle": "relative.bundle"}\n', "absolute bundle path")):
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(sock))
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            answer = json.loads(c.makefile("rb").readline())
        assert answer["ok"] is False and error in answer["error"], answer
    assert running.answer() == "digits@2" and _status(st, kr)["version"] == 2  # still serving, still answering


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"), reason="needs root and a system python")
def test_other_users_may_not_control_the_agent(tmp_path, settings, bundles):  # noqa: F811
    """Even with the socket opened up (0666), a process of another user is refused (SO_PEERCRED)."""
    import shutil
    import tempfile

    st = Path(tempfile.mkdtemp(prefix="edgeship-peer-"))  # outside pytest's 0700 folders: reachable by nobody
    try:
        assert run_cli("install", bundles["v1"], "--state-dir", st, "--keyring", settings.keyring_path).returncode == 0
        agent = AgentProcess(st, settings.keyring_path, tmp_path / "agent.log").start().wait_ready()
        try:
            st.chmod(0o755)
            (st / "agent.sock").chmod(0o666)
            code = (f"import socket; c = socket.socket(socket.AF_UNIX); c.connect({str(st / 'agent.sock')!r}); "
                    "c.sendall(b'{\"op\": \"status\"}\\n'); print(c.makefile().readline())")
            out = subprocess.run(["/usr/bin/python3", "-c", code], capture_output=True, text=True, timeout=60,
                                 user=65534, group=65534, cwd="/")
            assert out.returncode == 0, out.stderr
            assert "user 65534 may not control this agent" in out.stdout, out.stdout
            assert agent.answer() == "digits@1"
        finally:
            agent.stop()
    finally:
        shutil.rmtree(st, ignore_errors=True)


def test_status_never_recovers_or_writes(tmp_path, settings, bundles):  # noqa: F811
    """`status` beside an interrupted install (here: one killed in VerifyModel) reports it and touches
    nothing; the next owner recovers it."""
    st, kr = tmp_path / "state", settings.keyring_path
    assert run_cli("install", bundles["v1"], "--state-dir", st, "--keyring", kr).returncode == 0
    assert run_cli("install", bundles["v2"], "--state-dir", st, "--keyring", kr, faults="VerifyModel=crash"
                   ).returncode == -9

    def snapshot():
        return {str(p.relative_to(st)): (p.stat().st_mtime_ns, p.stat().st_size) for p in st.rglob("*")}

    before = snapshot()
    doc = _status(st, kr)
    assert snapshot() == before
    assert doc["version"] == 1 and doc["agent"] == {"running": False}
    assert "interrupted in VerifyModel" in doc["recovery_pending"]
    res = run_cli("install", bundles["v2"], "--state-dir", st, "--keyring", kr)  # the owner recovers, then installs
    assert res.returncode == 0, res.stdout + res.stderr
    doc = _status(st, kr)
    assert doc["version"] == 2 and doc["update"] is None and "recovery_pending" not in doc


def test_production_run_ignores_the_fault_variable(tmp_path, settings, bundles):  # noqa: F811
    st = tmp_path / "state"
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "install", str(bundles["v1"]), "--state-dir", str(st),
                           "--keyring", str(settings.keyring_path)], capture_output=True, text=True, cwd=ROOT,
                          env=agent_env(EDGESHIP_AGENT_FAULTS="Stage=crash,VerifyModel=crash"), timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("installed"), proc.stdout + proc.stderr
    agent = AgentProcess(st, settings.keyring_path, tmp_path / "a.log",
                         env={"EDGESHIP_AGENT_FAULTS": "Stage=crash,VerifyModel=crash,Commit=crash"}).start()
    try:
        agent.wait_ready()
        res = subprocess.run([sys.executable, "-m", "agent.cli", "install", str(bundles["v2"]), "--state-dir",
                              str(st), "--keyring", str(settings.keyring_path)], capture_output=True, text=True,
                             cwd=ROOT, env=agent_env(), timeout=120)
        assert res.returncode == 0 and agent.answer() == "digits@2" and agent.proc.poll() is None
    finally:
        agent.stop()
