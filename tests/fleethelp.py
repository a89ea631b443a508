"""Helpers for the fleet tests: agents with a fleet link, and a watcher of retained reported states."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from agent.fleet.mqtt import Broker, make_client
from agent.serve.service import Agent
from conftest import DEVICE_ARCH

needs_mosquitto = pytest.mark.skipif(shutil.which("mosquitto") is None and not os.path.exists(
    "/usr/sbin/mosquitto"), reason="mosquitto not installed (apt-get install mosquitto)")


def start_agent(tmp_path, name, broker, keyring, group="", **link_kw):
    from agent.fleet.link import FleetLink

    a = Agent(tmp_path / name, keyring, DEVICE_ARCH)
    a.start()
    link = FleetLink(a, keyring, Broker.parse(broker.url), "test", name, group, **link_kw)
    link.start()
    return a, link


class Watcher:
    """Collects retained reported states."""

    def __init__(self, broker):
        self.reports: dict[str, dict] = {}
        self.c = make_client(f"watcher-{time.time_ns()}", Broker.parse(broker.url))
        self.c.on_message = self._msg
        self.c.connect("127.0.0.1", broker.port)
        self.c.subscribe("edgeship/v1/test/device/+/reported", qos=1)
        self.c.loop_start()

    def _msg(self, c, u, m):
        if m.payload:
            d = json.loads(m.payload)
            self.reports[d["device"]] = d

    def wait(self, pred, timeout=60):
        end = time.time() + timeout
        while time.time() < end:
            if pred(self.reports):
                return True
            time.sleep(0.1)
        return False

    def stop(self):
        self.c.disconnect()
        self.c.loop_stop()


def agent_process(tmp_path, broker, keyring_dir, name, fleet="test", mqtt_extra="", faults=""):
    """`edgeship-agent run` as its own process, configured as the device under test; log in tmp_path/NAME.log.
    ``faults``: test-only fault injection (see agentproc)."""
    import subprocess
    from pathlib import Path

    from agentproc import agent_cmd

    conf = tmp_path / f"{name}.toml"
    conf.write_text(f'[agent]\nstate_dir = "{tmp_path / name}"\nkeyring = "{keyring_dir}"\ndevice_id = "{name}"\n'
                    f'arch = "{DEVICE_ARCH}"\n[http]\nport = 0\n[mqtt]\nbroker = "{broker.url}"\nfleet = "{fleet}"\n'
                    + mqtt_extra)
    with open(tmp_path / f"{name}.log", "ab") as log:
        return subprocess.Popen(agent_cmd("run", "--config", str(conf), faults=faults),
                                cwd=Path(__file__).resolve().parent.parent, stdout=log, stderr=subprocess.STDOUT)
