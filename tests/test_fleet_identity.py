"""MQTT identity on a real Mosquitto configured as deploy/mosquitto ships it, with the ACL `edgeship fleet
acl` writes: a device's login cannot take over another device's session, cannot leave its fleet and group,
retained state survives a broker SIGKILL, and a resumed rollout re-publishes what a broker lost."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.fleet.mqtt import Broker, connect_blocking, make_client
from agent.fleet.protocol import bundle_topic, device_topic, group_topic
from fleethelp import agent_process, needs_mosquitto, start_agent
from mosquitto import Mosquitto
from toolkit.cli import cli

pytestmark = needs_mosquitto
USERS = {"pi-a": "pw-a", "pi-b": "pw-b", "pi-x": "pw-x"}
HOST = {"edgeship-host": "h0st"}


@pytest.fixture()
def shipped_broker(tmp_path):
    """Fleet "idf": pi-a in group g1, pi-b in g2; fleet "other": pi-x in g1."""
    acl = tmp_path / "edgeship.acl"
    text = ""
    for fleet, devices in (("idf", ["pi-a=g1", "pi-b=g2"]), ("other", ["pi-x=g1"])):
        res = CliRunner().invoke(cli, ["fleet", "acl", "--fleet", fleet, *sum((["--device", d] for d in devices), [])])
        assert res.exit_code == 0, res.output
        text += res.output
    acl.write_text(text)
    folder = Path(tempfile.mkdtemp(prefix="edgeship-mosq-id-"))
    m = Mosquitto(folder, users=USERS, acl_file=acl, host_users=HOST).start()
    yield m
    m.stop()
    shutil.rmtree(folder, ignore_errors=True)


class Client:
    """A paho client logged in as ``user`` that records every message it receives, in order."""

    def __init__(self, broker, user: str, client_id: str | None = None):
        url = broker.host_url if user in HOST else broker.url
        self.b = Broker.parse(url, user, {**USERS, **HOST}[user], str(broker.ca_file))
        self.got: list[tuple[str, bytes]] = []
        self.c = make_client(client_id or f"{user}-{time.time_ns()}", self.b)
        self.c.on_message = lambda c, u, m: self.got.append((m.topic, m.payload))
        connect_blocking(self.c, self.b)

    def wait_for(self, topic: str, timeout: float = 20) -> bytes:
        end = time.time() + timeout
        while time.time() < end:
            for t, p in self.got:
                if t == topic:
                    return p
            time.sleep(0.02)
        raise AssertionError(f"no message on {topic}; got {[t for t, _ in self.got]}")

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_a_device_login_cannot_take_over_another_devices_session(tmp_path, shipped_broker, settings, signing_key):
    """pi-a, with its own password, connects as pi-b's client id (the one the agent uses, and the one it used
    before ids were identities): the broker names the session after pi-a; pi-b's presence never flaps."""
    host = Client(shipped_broker, "edgeship-host")
    presence, sentinel = device_topic("idf", "pi-b", "presence"), "edgeship/v1/idf/sentinel"
    host.c.subscribe([(presence, 1), (sentinel, 1)])
    b = agent_process(tmp_path, shipped_broker, settings.keyring_path, "pi-b", fleet="idf", mqtt_extra=(
        f'username = "pi-b"\npassword = "pw-b"\nca_file = "{shipped_broker.ca_file}"\ngroup = "g2"\nheartbeat = 3600\n'))
    try:
        assert json.loads(host.wait_for(presence, 60))["online"] is True
        seen = len(host.got)
        for _ in range(3):
            for stolen_id in ("pi-b", "edgeship-idf-pi-b"):
                Client(shipped_broker, "pi-a", stolen_id).stop()
        host.c.publish(sentinel, b"end", qos=1).wait_for_publish(5)
        host.wait_for(sentinel)  # anything the attack caused has been delivered before
        after = [json.loads(p) for t, p in host.got[seen:] if t == presence]
        assert after == [], after  # no offline (last will on takeover), no reconnect
        log = (shipped_broker.folder / "mosquitto.log").read_text()
        assert "as pi-a (" in log and "already connected, closing old connection" not in log
        assert b.poll() is None
    finally:
        b.terminate()
        b.wait(30)
        host.stop()


def test_a_device_stays_in_its_fleet_and_group(shipped_broker, signing_key):
    host = Client(shipped_broker, "edgeship-host")
    hostx = Client(shipped_broker, "edgeship-host")
    forbidden_reads = [group_topic("idf", "g2"), device_topic("idf", "pi-b", "desired"),
                       bundle_topic("other", "f" * 64) + "/index", group_topic("other", "g1")]
    allowed_reads = [device_topic("idf", "pi-a", "desired"), group_topic("idf", "g1"),
                     bundle_topic("idf", "a" * 64) + "/index"]
    for topic in forbidden_reads + allowed_reads:
        host.c.publish(topic, json.dumps({"topic": topic}), qos=1, retain=True).wait_for_publish(5)
    pi_a = Client(shipped_broker, "pi-a")
    try:
        pi_a.c.subscribe([(t, 1) for t in forbidden_reads + allowed_reads])  # retained ones come in this order
        pi_a.wait_for(allowed_reads[-1])
        assert {t for t, _ in pi_a.got} == set(allowed_reads)
        hostx.c.subscribe("edgeship/v1/#", qos=1)
        forbidden_writes = [device_topic("other", "pi-a", "telemetry"), device_topic("idf", "pi-b", "reported"),
                            group_topic("idf", "g1"), bundle_topic("idf", "b" * 64) + "/index",
                            device_topic("idf", "pi-a", "desired")]
        own = device_topic("idf", "pi-a", "telemetry")
        hostx.wait_for(allowed_reads[0])  # the subscription is in place
        for topic in forbidden_writes + [own]:
            pi_a.c.publish(topic, b"{}", qos=1).wait_for_publish(5)
        hostx.wait_for(own)  # published last by the same client: the others were handled before it
        assert not {t for t, p in hostx.got if p == b"{}"} & set(forbidden_writes)
    finally:
        for c in (pi_a, host, hostx):
            c.stop()


def test_retained_state_survives_a_broker_sigkill(tmp_path, shipped_broker, signing_key, fleet_bundles):
    from toolkit.fleet.publish import publish

    b = Broker.parse(shipped_broker.host_url, "edgeship-host", "h0st", str(shipped_broker.ca_file))
    res = publish(fleet_bundles["v1"], b, "idf", signing_key, group="g1")
    topics = [group_topic("idf", "g1"), bundle_topic("idf", res["sha256"]) + "/index"]
    host = Client(shipped_broker, "edgeship-host")
    host.c.subscribe(topics[0], qos=1)
    desired = host.wait_for(topics[0])
    host.stop()
    db = shipped_broker.folder / "edgeship.db"
    end = time.time() + 45
    while time.time() < end and not (db.exists() and desired in db.read_bytes()):
        time.sleep(0.2)  # the shipped autosave_interval (30 s) writes it: no signal, no clean stop
    assert db.exists() and desired in db.read_bytes(), "the desired state never reached the database"
    shipped_broker.kill()
    shipped_broker.start()
    host = Client(shipped_broker, "edgeship-host")
    try:
        host.c.subscribe([(t, 1) for t in topics])
        assert host.wait_for(topics[0]) == desired
        assert json.loads(host.wait_for(topics[1]))["sha256"] == res["sha256"]
    finally:
        host.stop()


def test_resumed_rollout_republishes_what_the_broker_lost(tmp_path, broker, keyring, signing_key, fleet_bundles):
    """The host stops after the canary wave; the broker is SIGKILLed and loses every retained message; the
    resumed rollout publishes the bundle and the canary's desired state again, and the next wave installs."""
    from toolkit.fleet.publish import Publisher, publish
    from toolkit.fleet.rollout import Rollouts

    b = Broker.parse(broker.url)
    agents = [start_agent(tmp_path, f"g-{i}", broker, keyring, group="line") for i in range(2)]
    try:
        publish(fleet_bundles["v1"], b, "test", signing_key, group="line")
        end = time.time() + 30
        while time.time() < end and not all(a.current and a.current.manifest.version == 1 for a, _ in agents):
            time.sleep(0.05)

        class HostStopped(Exception):
            pass

        def echo(msg: str) -> None:
            if "wave 2/2" in msg:
                raise HostStopped(msg)

        ro = Rollouts(tmp_path / "registry.db", b, "test", lambda: Publisher(b, "test", signing_key), echo=echo)
        with pytest.raises(HostStopped):
            ro.start(fleet_bundles["v2"], "line", canary_pct=50, timeout=60)
        rid = ro.list()[0]["id"]
        assert ro.get(rid)["state"] == "running" and ro.get(rid)["plan"]["wave"] == 1
        assert agents[0][0].current.manifest.version == 2 and agents[1][0].current.manifest.version == 1
        broker.kill()
        for f in broker.folder.glob("*.db"):
            f.unlink()  # everything retained is gone
        broker.start()
        r = Rollouts(tmp_path / "registry.db", b, "test", lambda: Publisher(b, "test", signing_key),
                     ).resume(rid)
        assert r["state"] == "completed", r
        assert agents[1][0].current.manifest.version == 2
        got, seen = threading.Event(), []
        c = make_client(f"check-{time.time_ns()}", b)
        c.on_message = lambda cl, u, m: (seen.append(m.topic), got.set())
        connect_blocking(c, b)
        c.subscribe(device_topic("test", "g-0", "desired"), qos=1)  # the canary's desired state is back
        assert got.wait(20) and seen == [device_topic("test", "g-0", "desired")]
        c.disconnect()
        c.loop_stop()
    finally:
        for _, link in agents:
            link.stop()
