"""Helpers for the fleet tests: agents with a fleet link, and a watcher of retained reported states."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time

import pytest

from agent.fleet.mqtt import Broker, make_client
from agent.serve.service import Agent
from conftest import DEVICE_ARCH

needs_mosquitto = pytest.mark.skipif(shutil.which("mosquitto") is None and not os.path.exists(
    "/usr/sbin/mosquitto"), reason="mosquitto not installed (apt-get install mosquitto)")


def start_agent(tmp_path, name, broker, keyring, group="", opener=None, **link_kw):
    """An in-process agent with a fleet link in fleet "test"; ``opener``: its model key (agent.seal.Opener)."""
    from agent.fleet.link import FleetLink

    a = Agent(tmp_path / name, keyring, DEVICE_ARCH, opener=opener)
    a.start()
    link = FleetLink(a, keyring, Broker.parse(broker.url), "test", name, group, **link_kw)
    link.subs = Subs(link.client)
    link.start()
    return a, link


def wait_for(pred, timeout=60.0, poll=0.05):
    """Poll an observable condition (a file, a report, a row) until it holds; False after ``timeout``."""
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(poll)
    return bool(pred())


class Subs:
    """The topics a paho client's broker has acknowledged (SUBACK): a test publishes non-retained messages
    only once the agent's subscription is in place."""

    def __init__(self, client):
        self.pending: dict[int, list[str]] = {}
        self.early: set[int] = set()  # SUBACKs that arrived before subscribe() returned their mid
        self.acked: set[str] = set()
        self._lock = threading.Lock()
        subscribe = client.subscribe

        def tracked(topic, qos=0, *a, **kw):
            rc, mid = subscribe(topic, qos, *a, **kw)
            topics = [topic] if isinstance(topic, str) else [t[0] if isinstance(t, tuple) else t for t in topic]
            with self._lock:
                if mid in self.early:
                    self.early.discard(mid)
                    self.acked.update(topics)
                else:
                    self.pending[mid] = topics
            return rc, mid

        def on_subscribe(c, userdata, mid, *rest):
            with self._lock:
                if mid in self.pending:
                    self.acked.update(self.pending.pop(mid))
                else:
                    self.early.add(mid)

        client.subscribe, client.on_subscribe = tracked, on_subscribe

    def has(self, *topics):
        with self._lock:
            return set(topics) <= self.acked


class LogWatch(logging.Handler):
    """Log lines of a logger (e.g. the agent's "ignored message" or "chunk hash mismatch"), for waiting on them."""

    def __init__(self, name):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.logger = logging.getLogger(name)
        self.logger.addHandler(self)
        self._level = self.logger.level
        self.logger.setLevel(logging.DEBUG)

    def emit(self, record):
        self.lines.append(record.getMessage())

    def count(self, text):
        return sum(text in line for line in list(self.lines))

    def close(self):
        self.logger.removeHandler(self)
        self.logger.setLevel(self._level)
        super().close()


class Watcher:
    """Collects retained reported states and presence."""

    def __init__(self, broker):
        self.reports: dict[str, dict] = {}
        self.online: dict[str, bool] = {}
        self.c = make_client(f"watcher-{time.time_ns()}", Broker.parse(broker.url))
        self.c.on_message = self._msg
        self.c.connect("127.0.0.1", broker.port)
        self.c.subscribe([("edgeship/v1/test/device/+/reported", 1), ("edgeship/v1/test/device/+/presence", 1)])
        self.c.loop_start()

    def _msg(self, c, u, m):
        if m.payload:
            d = json.loads(m.payload)
            if m.topic.endswith("/presence"):
                self.online[m.topic.split("/")[4]] = d["online"]
            else:
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


class Hand:
    """A publisher driven by hand: the index, chunks and signed desired state, each when the test says."""

    def __init__(self, broker, name, data, key, chunk_size):
        from agent.fleet.protocol import bundle_topic, index_doc

        self.c = make_client(name, Broker.parse(broker.url))
        self.c.connect("127.0.0.1", broker.port)
        self.c.loop_start()
        self.data, self.key = data, key
        self.idx = index_doc(data, chunk_size=chunk_size)
        self.prefix = bundle_topic("test", self.idx["sha256"])
        self.n = len(self.idx["chunks"])

    def _pub(self, topic, payload, retain):
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def index(self, payload=None, retain=True):
        self._pub(f"{self.prefix}/index", json.dumps(self.idx) if payload is None else payload, retain)

    def chunks(self, which, retain=True):
        cs = self.idx["chunk_size"]
        for i in which:
            self._pub(f"{self.prefix}/chunk/{i}", self.data[i * cs:(i + 1) * cs], retain)

    def desire(self, device, version=2):
        from agent.fleet.protocol import desired_doc, device_topic, sign_message

        doc = desired_doc("digits", version, self.idx["sha256"], len(self.data), f"device:{device}")
        self._pub(device_topic("test", device, "desired"), sign_message(doc, self.key.key_id, self.key.sign), True)

    def stop(self):
        self.c.loop_stop()
