"""Chaos: installs through the control channel of an `edgeship-agent run` process that is SIGKILLed at a
random moment, 30 times. After every restart the agent serves v1 or v2 (asked over HTTP), never neither;
`status` says the version that answers and the bundle it came from; the state dir does not grow."""

from __future__ import annotations

import hashlib
import random
import threading
import time

from agent import control
from agent.errors import AgentError
from agent.store import is_temp
from agentproc import AgentProcess, run_cli
from test_install import bundles, keyring_dir  # noqa: F401 (fixtures)

ITERATIONS = 30


def _wait_idle(st, timeout: float = 60) -> dict:
    """The running agent's status once no update is in progress (an install may outlive its client)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        doc = control.call(st, {"op": "status"})
        if doc is not None and doc["update"] is None:
            return doc
        time.sleep(0.05)
    raise AssertionError(f"the agent never became idle: {doc}")


def _footprint(st) -> tuple[list[str], int]:
    files = [p for p in st.rglob("*")]
    assert not [p for p in files if is_temp(p.name)], "temp files of killed writes were not swept"
    return sorted(p.name for p in st.iterdir()), sum(p.stat().st_size for p in files if p.is_file())


def test_random_sigkill_during_installs(tmp_path, keyring_dir, bundles):  # noqa: F811
    rng = random.Random(11)
    st = tmp_path / "state"
    sha = {f"digits@{v}": hashlib.sha256(bundles[f"v{v}"].read_bytes()).hexdigest() for v in (1, 2)}
    assert run_cli("install", bundles["v1"], "--state-dir", st, "--keyring", keyring_dir).returncode == 0
    agent = AgentProcess(st, keyring_dir, tmp_path / "agent.log").start().wait_ready()
    names, size = _footprint(st)
    seen: dict[str, int] = {}
    try:
        for i in range(ITERATIONS):
            served = agent.answer()
            target = bundles["v2"] if served == "digits@1" else bundles["v1"]
            answers: list = []

            def install() -> None:
                try:
                    answers.append(control.call(st, {"op": "install", "bundle": str(target), "allow_downgrade": True},
                                                timeout=60))
                except AgentError as exc:  # the agent died under the request: said, not hung
                    answers.append(exc)

            client = threading.Thread(target=install)
            client.start()
            time.sleep(rng.uniform(0.0, 0.4))  # a random moment of the install (chaos, not synchronisation)
            agent.kill()
            client.join(60)
            assert not client.is_alive() and answers, f"iteration {i}: the client hung"
            agent = AgentProcess(st, keyring_dir, tmp_path / "agent.log").start().wait_ready()
            doc = _wait_idle(st)
            served = agent.answer()
            assert served in sha, f"iteration {i}: serving {served!r}"
            assert (f"{doc['model']}@{doc['version']}", doc["installed_sha256"]) == (served, sha[served]), (i, doc)
            assert agent.answer() == served
            now, bytes_ = _footprint(st)
            assert now == names and len(list((st / "slots").iterdir())) <= 2, (i, now)
            assert bytes_ <= size * 2 + (64 << 10), (i, bytes_, size)  # v1 + v2 side by side, at most
            seen[served] = seen.get(served, 0) + 1
    finally:
        agent.stop()
    assert len(seen) == 2, seen  # the kills landed both before and after commits
