"""`edgeship-agent` as a separate process, the worktree's code (run from the repository root).

Fault injection is for tests only: the production entry point never reads it from the environment. A test
that wants it starts the agent through ``FAULT_RUNNER``, which fills ``agent.cli.FAULTS`` in that process
("Commit=crash,VerifyModel=error": SIGKILL on entering a persisted state, or raise inside a state).
"""

from __future__ import annotations

from pathlib import Path

from conftest import DEVICE_ARCH, PYTHON

ROOT = Path(__file__).resolve().parent.parent
FAULT_RUNNER = ("import sys; from agent import cli; "
                "cli.FAULTS.update(f.split('=', 1) for f in sys.argv.pop(1).split(',') if '=' in f); cli.main()")


def agent_cmd(*args: str, faults: str = "") -> list[str]:
    """argv for ``edgeship-agent ARGS`` (cwd must be ROOT); ``faults`` injects faults into that process."""
    if faults:
        return [*PYTHON, "-c", FAULT_RUNNER, faults, *map(str, args)]
    return [*PYTHON, "-m", "agent.cli", *map(str, args)]


def agent_env(**extra: str) -> dict[str, str]:
    """The environment of an agent process configured as the device under test (a Raspberry Pi 4 on a host)."""
    import os

    return {**os.environ, "EDGESHIP_AGENT_ARCH": DEVICE_ARCH, **extra}


def run_cli(*args: str, faults: str = "", timeout: float = 120):
    """``edgeship-agent ARGS`` to completion (a CompletedProcess with text output)."""
    import subprocess

    return subprocess.run(agent_cmd(*args, faults=faults), capture_output=True, text=True, cwd=ROOT,
                          env=agent_env(), timeout=timeout)


class AgentProcess:
    """`edgeship-agent run` on a state dir, serving HTTP on a free port; its output goes to ``log``."""

    def __init__(self, state_dir: Path, keyring_dir: Path, log: Path, faults: str = "",
                 env: dict[str, str] | None = None):
        self.state_dir, self.keyring_dir, self.log, self.faults = state_dir, keyring_dir, log, faults
        self.env = env or {}
        self.proc = None
        self.port: int | None = None

    def start(self) -> "AgentProcess":
        import subprocess

        self._from = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(agent_cmd("run", "--state-dir", self.state_dir, "--keyring", self.keyring_dir,
                                                   "--port", "0", faults=self.faults),
                                         cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         env=agent_env(**self.env))
        return self

    def wait_ready(self, timeout: float = 60.0) -> "AgentProcess":
        """Until it prints the address it serves on (after recovery, with its control channel up)."""
        import re
        import time

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.log.read_bytes()[self._from:].decode(errors="replace")
            if m := re.search(r"serving .* on https?://[^:]+:(\d+)", text):
                self.port = int(m.group(1))
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}: {text[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"agent not ready after {timeout} s: {self.log.read_text()[-3000:]}")

    def answer(self) -> str | None:
        """Which model answers a request over HTTP ("digits@2"), None when it serves no model."""
        import http.client
        import json

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("POST", "/predict", json.dumps({"input": [[[[0.5]] * 8] * 8]}),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            body = json.loads(resp.read())
        finally:
            conn.close()
        return body.get("model") if resp.status == 200 else None

    def kill(self) -> None:
        import signal

        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc:
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except Exception:
                self.kill()
