"""Device identity on a real Mosquitto running deploy/mosquitto/edgeship.conf (mutual TLS, CRL) with the ACL of
the enrolled identities: an enrolled device (its folder exactly as `edgeship device enroll` wrote it) connects
and updates; it cannot act as another device (client id, topics); a host tool without the right certificate
cannot set a desired state; a revoked device cannot connect, and its open connection loses every topic."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest

from agent.errors import AgentError
from agent.fleet.mqtt import Broker, connect_blocking, make_client
from agent.fleet.protocol import device_topic, group_topic
from fleethelp import needs_mosquitto, wait_for
from mosquitto import make_ca_and_server_cert
from securityhelp import FLEET, SecureHome, device_agent, edgeship, mtls_broker

pytestmark = needs_mosquitto


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, signing_key):
    folder = tmp_path_factory.mktemp("sec-id")
    sec = SecureHome(folder, signing_key)
    for name, group in (("pi-a", "g1"), ("pi-b", "g1"), ("pi-c", "g2")):
        sec.enroll(name, group, "mqtts://broker.invalid:8883")
    broker = mtls_broker(sec)
    yield sec, broker
    broker.stop()
    shutil.rmtree(broker.folder, ignore_errors=True)


class Cert:
    """A paho client logged in with an enrolled device's (or the host's) certificate."""

    def __init__(self, broker, folder, client_id, host=False):
        cert, key = ("host.pem", "host.key") if host else ("device.pem", "device.key")
        self.b = Broker.parse(broker.host_url if host else broker.url, ca_file=str(folder / "ca.pem"),
                              cert_file=str(folder / cert), key_file=str(folder / key))
        self.got: list[tuple[str, bytes]] = []
        self.acked: set[int] = set()
        self.c = make_client(client_id, self.b)
        self.c.on_message = lambda c, u, m: self.got.append((m.topic, m.payload))
        self.c.on_subscribe = lambda c, u, mid, *rest: self.acked.add(mid)
        connect_blocking(self.c, self.b)

    def sub(self, *topics):
        """Subscribe and wait for the broker's SUBACK."""
        _, mid = self.c.subscribe([(t, 1) for t in topics])
        assert wait_for(lambda: mid in self.acked, 20)

    def wait_for(self, topic, timeout=20):
        assert wait_for(lambda: any(t == topic for t, _ in self.got), timeout), [t for t, _ in self.got]
        return [p for t, p in self.got if t == topic][-1]

    def stop(self):
        self.c.disconnect()
        self.c.loop_stop()


def test_device_folder_is_complete_private_and_holds_no_host_secret(fleet):
    sec, _ = fleet
    folder = sec.devices / "pi-a"
    assert sorted(p.name for p in folder.iterdir()) == ["agent.toml", "ca.pem", "device.key", "device.pem",
                                                       "keyring.json", "model.key", "root.pub"]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("device.key", "model.key"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    assert stat.S_IMODE((sec.home / "ca" / "ca.key").stat().st_mode) == 0o600
    everything = b"".join(p.read_bytes() for p in folder.iterdir())
    for secret in (sec.home / "ca" / "ca.key", sec.root_key, sec.settings.key_path):
        key_body = secret.read_bytes().split(b"-----")[2].strip()
        assert key_body not in everything, f"{secret.name} leaked into the device folder"
    assert edgeship(sec.home, "device", "enroll", "pi-a", "--group", "g1", "--fleet", FLEET, "--broker",
                    "mqtts://x:8883", "-o", sec.devices / "again", ok=False).exit_code == 1  # one identity per name
    assert not (sec.devices / "again").exists()


def test_enrolled_device_connects_and_updates_and_cannot_act_as_another(tmp_path, fleet, fleet_bundles):
    sec, broker = fleet
    host = Cert(broker, sec.host_dir, "test-host", host=True)
    presence = device_topic(FLEET, "pi-a", "presence")
    host.sub(presence, f"edgeship/v1/{FLEET}/#")
    agent = device_agent(sec.devices / "pi-a", tmp_path / "pi-a", tmp_path / "pi-a.log", broker)
    try:
        assert json.loads(host.wait_for(presence, 60))["online"] is True
        edgeship(sec.home, "publish", fleet_bundles["v1"], "--device", "pi-a", *sec.host_conn(broker))
        assert wait_for(lambda: sec.devices_json(broker).get("pi-a", {}).get("status") == "installed", 90), \
            (tmp_path / "pi-a.log").read_text()[-3000:]
        assert sec.devices_json(broker)["pi-a"]["version"] == 1
        seen = len(host.got)
        # pi-b's certificate with pi-a's client id: the broker names the session pi-b; pi-a never flaps
        thief = Cert(broker, sec.devices / "pi-b", "pi-a")
        for topic in (device_topic(FLEET, "pi-a", "reported"), device_topic(FLEET, "pi-a", "presence"),
                      group_topic(FLEET, "g1"), device_topic(FLEET, "pi-a", "desired")):
            thief.c.publish(topic, b'{"forged": true}', qos=1).wait_for_publish(5)
        own = device_topic(FLEET, "pi-b", "telemetry")
        thief.c.publish(own, b"{}", qos=1).wait_for_publish(5)  # allowed: its own topic, sent last
        host.wait_for(own)
        thief.stop()
        assert not [t for t, p in host.got[seen:] if b"forged" in p]  # every publish as pi-a was dropped
        assert not [p for t, p in host.got[seen:] if t == presence]  # no takeover: no offline, no reconnect
        log = (broker.folder / "mosquitto.log").read_text()
        assert "as pi-b (" in log and "already connected, closing old connection" not in log
        assert agent.poll() is None
    finally:
        agent.terminate()
        agent.wait(30)
        host.stop()


def test_host_tools_need_the_host_certificate(tmp_path, fleet, fleet_bundles):
    sec, broker = fleet
    watch = Cert(broker, sec.host_dir, "watch-desired", host=True)
    topic = device_topic(FLEET, "pi-c", "desired")
    watch.sub(topic)
    pub = ["publish", fleet_bundles["v1"], "--device", "pi-c", "--broker", broker.host_url, "--fleet", FLEET,
           "--ca-file", sec.host_dir / "ca.pem"]
    res = edgeship(sec.home, *pub, ok=False)  # no client certificate: the TLS handshake is refused
    assert res.exit_code == 1 and "cannot reach" in res.output, res.output
    dev = sec.devices / "pi-b"  # a device's certificate on the host listener: it is the device there
    edgeship(sec.home, *pub, "--cert-file", dev / "device.pem", "--key-file", dev / "device.key")
    stranger = tmp_path / "stranger"  # a certificate from another CA
    stranger.mkdir()
    ca, cert, key = make_ca_and_server_cert(stranger)
    res = edgeship(sec.home, *pub[:-2], "--ca-file", sec.host_dir / "ca.pem", "--cert-file", cert, "--key-file", key,
                   ok=False)
    assert res.exit_code == 1, res.output
    sentinel = f"edgeship/v1/{FLEET}/host/watch/sync"  # published after every attempt above was handled
    watch.sub(sentinel)
    watch.c.publish(sentinel, b"end", qos=1).wait_for_publish(5)
    watch.wait_for(sentinel)
    assert not [t for t, _ in watch.got if t == topic], "a desired state got through without the host identity"
    watch.stop()


def test_revoked_device_cannot_connect_and_loses_its_open_connection(fleet):
    sec, broker = fleet
    host = Cert(broker, sec.host_dir, "rev-host", host=True)
    peer = Cert(broker, sec.devices / "pi-a", "pi-a-peer")  # pi-a, also in group g1: the positive control
    open_conn = Cert(broker, sec.devices / "pi-b", "pi-b")  # connected before the revocation
    own, g1 = device_topic(FLEET, "pi-b", "telemetry"), group_topic(FLEET, "g1")
    host.sub(own)
    for c in (peer, open_conn):
        c.sub(g1)
    open_conn.c.publish(own, b"before", qos=1).wait_for_publish(5)
    assert host.wait_for(own) == b"before"
    edgeship(sec.home, "device", "revoke", "pi-b")
    assert "pi-b" not in sec.acl().read_text()
    broker.reload(acl_file=sec.acl(), crl=sec.home / "ca" / "crl.pem")
    with pytest.raises(AgentError, match="cannot reach"):  # the handshake fails: certificate revoked
        Cert(broker, sec.devices / "pi-b", "pi-b-again")
    host.c.publish(g1, b"for-g1", qos=1).wait_for_publish(5)
    peer.wait_for(g1)
    # the open connection: its publish is dropped, and its PUBACK comes after anything sent to it before
    open_conn.c.publish(own, b"after", qos=1).wait_for_publish(5)
    assert not [t for t, _ in open_conn.got if t == g1]
    sentinel = device_topic(FLEET, "pi-a", "telemetry")
    host.sub(sentinel)
    peer.c.publish(sentinel, b"end", qos=1).wait_for_publish(5)
    host.wait_for(sentinel)
    assert [p for t, p in host.got if t == own] == [b"before"]
    rows = {r["name"]: r for r in json.loads(edgeship(sec.home, "device", "list", "--json").output)}
    assert rows["pi-b"]["revoked"] and not rows["pi-a"]["revoked"]
    for c in (open_conn, peer, host):
        c.stop()


def test_password_enrollment_for_brokers_without_client_certificates(tmp_path, fleet):
    """`enroll --password`: the password only in the device folder (0600, read through password_file), its
    mosquitto_passwd hash for the broker, which Mosquitto (edgeship-passwords.conf as shipped) accepts."""
    import tempfile

    from agent.config import load_config
    from mosquitto import Mosquitto

    sec, _ = fleet
    res = edgeship(sec.home, "device", "enroll", "pi-pw", "--group", "g1", "--fleet", FLEET, "--broker",
                   "mqtts://127.0.0.1:8883", "--password", "-o", sec.devices / "pi-pw")
    folder = sec.devices / "pi-pw"
    secret = (folder / "mqtt.password").read_text().strip()
    assert stat.S_IMODE((folder / "mqtt.password").stat().st_mode) == 0o600 and len(secret) >= 32
    assert secret not in res.output and secret not in (folder / "agent.toml").read_text()
    cfg = load_config(folder / "agent.toml", env={})
    assert (cfg.mqtt_username, cfg.mqtt_password, cfg.mqtt_cert_file) == ("pi-pw", secret, None)
    lines = (sec.home / "ca" / "mosquitto.passwd").read_text()
    assert lines.startswith("pi-pw:$7$") and secret not in lines
    m = Mosquitto(Path(tempfile.mkdtemp(prefix="edgeship-mosq-pw-")), users={"other": "x"}, acl_file=sec.acl(),
                  host_users={"edgeship-host": "h0st"}, passwd_lines=lines).start()
    try:
        ok = Broker.parse(m.url, "pi-pw", secret, str(m.ca_file))
        c = make_client("pi-pw", ok)
        connect_blocking(c, ok)
        c.disconnect()
        c.loop_stop()
        bad = Broker.parse(m.url, "pi-pw", secret[:-1], str(m.ca_file))
        with pytest.raises(AgentError, match="refused"):
            connect_blocking(make_client("pi-pw", bad), bad)
    finally:
        m.stop()
        shutil.rmtree(m.folder, ignore_errors=True)
    edgeship(sec.home, "device", "revoke", "pi-pw")
    assert "pi-pw" not in (sec.home / "ca" / "mosquitto.passwd").read_text()
