"""Signing keys that change, end to end on a running fleet (two `edgeship-agent run` processes provisioned by
`edgeship device enroll`, Mosquitto with the shipped mutual-TLS configuration): rotate, roll out with the new
key, renew the desired states, revoke the old key — then a replayed desired state and a bundle signed by the
old key are refused and reported, and the devices keep serving what they run."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from agent.fleet.mqtt import Broker
from agent.fleet.protocol import group_topic
from agentproc import run_cli
from fleethelp import needs_mosquitto, wait_for
from securityhelp import FLEET, SecureHome, device_agent, edgeship, mtls_broker
from test_install import rebundle
from test_security_identity import Cert
from toolkit.fleet.publish import publish
from toolkit.signing import load_key

pytestmark = needs_mosquitto
DEVICES = ("pi-r1", "pi-r2")


@pytest.fixture()
def fleet(tmp_path, signing_key):
    sec = SecureHome(tmp_path, signing_key)
    for name in DEVICES:
        sec.enroll(name, "rot", "mqtts://broker.invalid:8883")
    broker = mtls_broker(sec)
    yield sec, broker
    broker.stop()
    shutil.rmtree(broker.folder, ignore_errors=True)


def _keyring_version(state_dir):
    try:
        return json.loads((state_dir / "keyring.json").read_text())["version"]
    except (OSError, ValueError):
        return None


def test_rotate_roll_out_revoke_and_refuse_the_old_key(tmp_path, fleet, fleet_bundles, signing_key):
    sec, broker = fleet
    conn = sec.host_conn(broker)
    state = {d: tmp_path / "state" / d for d in DEVICES}
    agents = [device_agent(sec.devices / d, state[d], tmp_path / f"{d}.log", broker) for d in DEVICES]
    host = Cert(broker, sec.host_dir, "rot-watch", host=True)
    host.sub(group_topic(FLEET, "rot"))

    def reports():
        return sec.devices_json(broker)

    def logs():
        return "\n".join((tmp_path / f"{d}.log").read_text()[-2000:] for d in DEVICES)

    try:
        assert wait_for(lambda: all(reports().get(d, {}).get("online") for d in DEVICES), 60), logs()
        k1 = signing_key.key_id
        edgeship(sec.home, "rollout", "start", fleet_bundles["v1"], "--group", "rot", "--canary", "50%", *conn)
        old_desired = host.wait_for(group_topic(FLEET, "rot"))  # the group's v1 state, signed by the old key
        assert json.loads(old_desired)["key_id"] == k1
        capture_topic = group_topic(FLEET, "rot", "capture_request")
        host.sub(capture_topic)
        edgeship(sec.home, "capture", "request", "--group", "rot", "--minutes", "60", *conn)  # still running later
        assert json.loads(host.wait_for(capture_topic))["key_id"] == k1

        edgeship(sec.home, "keys", "rotate", "--root-key", sec.root_key, *conn)
        k2 = load_key(sec.settings.key_path)
        assert k2.key_id != k1
        assert wait_for(lambda: all(_keyring_version(state[d]) == 2 for d in DEVICES), 30), logs()

        v2 = rebundle(fleet_bundles["v1"], tmp_path / "v2.bundle", k2, version=2)  # built with the new key
        edgeship(sec.home, "rollout", "start", v2, "--group", "rot", "--canary", "50%", *conn)
        assert all(r["version"] == 2 and r["status"] == "installed" for d, r in reports().items() if d in DEVICES)
        res = edgeship(sec.home, "fleet", "refresh", "--all", "--json", *conn)  # every state now signed by k2
        rows = {r["topic"]: r["action"] for r in json.loads(res.output)}
        assert rows.pop(capture_topic) == "re-signed" and set(rows.values()) == {"renewed"}, res.output
        assert wait_for(lambda: json.loads(host.wait_for(capture_topic))["key_id"] == k2.key_id, 20)

        # revoking with the root key offline: a request here, signed there, published here
        edgeship(sec.home, "keys", "revoke", k1, *conn)
        signed = tmp_path / "carried-back.json"
        edgeship(sec.root_dir, "keys", "sign-keyring", sec.home / "keys" / "keyring-request.json", "--root-key",
                 sec.root_key, "-o", signed)
        edgeship(sec.home, "keys", "publish-keyring", signed, *conn)
        assert wait_for(lambda: all(_keyring_version(state[d]) == 3 for d in DEVICES), 30), logs()
        for d in DEVICES:
            assert "error" not in reports()[d] or not reports()[d]["error"], reports()[d]  # renewed states pass

        # a replay of the old group state (a captured message, or a broker restored from a backup)
        host.c.publish(group_topic(FLEET, "rot"), old_desired, qos=1, retain=True).wait_for_publish(5)
        assert wait_for(lambda: all("revoked" in (reports()[d].get("error") or "") for d in DEVICES), 30), reports()
        # a bundle signed by the old key, in a desired state the current key signed (v3: a newer version)
        v3 = rebundle(fleet_bundles["v1"], tmp_path / "v3.bundle", signing_key, version=3)
        b = Broker.parse(broker.host_url, ca_file=str(sec.host_dir / "ca.pem"),
                         cert_file=str(sec.host_dir / "host.pem"), key_file=str(sec.host_dir / "host.key"))
        publish(v3, b, FLEET, k2, group="rot")
        assert wait_for(lambda: all(reports()[d].get("status") == "failed" for d in DEVICES), 60), reports()
        for d in DEVICES:
            r = reports()[d]
            assert f"signed by key {k1}, which the fleet's root revoked" in r["error"], r
            assert r["version"] == 2 and r["installed_sha256"] == hashlib.sha256(v2.read_bytes()).hexdigest()
        # what the running agent trusts (asked over its control channel): keyring v3, k1 revoked
        doc = json.loads(run_cli("status", "--state-dir", state["pi-r1"], "--keyring",
                                 sec.devices / "pi-r1" / "keyring.json", "--root-key",
                                 sec.devices / "pi-r1" / "root.pub").stdout)
        assert doc["keyring"]["version"] == 3 and doc["keyring"]["revoked"] == [k1] and doc["version"] == 2
    finally:
        for a in agents:
            a.terminate()
            a.wait(30)
        host.stop()
