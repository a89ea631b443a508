"""Fleet over TLS with username/password on a real Mosquitto configured as deploy/mosquitto ships it, with
the ACL `edgeship fleet acl` writes: the host CLI and an agent process both use mqtts:// with a CA file;
the ACL lets a device do its job; wrong credentials are refused by the broker and the agent keeps running."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fleethelp import agent_process, needs_mosquitto
from mosquitto import Mosquitto
from toolkit.cli import cli

pytestmark = needs_mosquitto


@pytest.fixture()
def tls_broker(tmp_path):
    folder = Path(tempfile.mkdtemp(prefix="edgeship-mosq-tls-"))
    acl = tmp_path / "edgeship.acl"
    res = CliRunner().invoke(cli, ["fleet", "acl", "--fleet", "tls", "--device", "pi-tls", "--device", "pi-bad",
                                   "-o", str(acl)])
    assert res.exit_code == 0, res.output
    m = Mosquitto(folder, users={"pi-tls": "s3cret", "pi-bad": "right"}, acl_file=acl,
                  host_users={"edgeship-host": "h0st"}).start()
    yield m
    m.stop()
    shutil.rmtree(folder, ignore_errors=True)


def _agent(tmp_path, broker, keyring_dir, name, password):
    return agent_process(tmp_path, broker, keyring_dir, name, fleet="tls", mqtt_extra=(
        f'username = "{name}"\npassword = "{password}"\nca_file = "{broker.ca_file}"\n'))


def test_tls_and_credentials_on_both_sides(tmp_path, tls_broker, settings, fleet_bundles):
    home = ["--home", str(settings.home)]
    (tmp_path / "host.pw").write_text("h0st\n")
    conn = ["--broker", tls_broker.host_url, "--fleet", "tls", "--username", "edgeship-host", "--password-file",
            str(tmp_path / "host.pw"), "--ca-file", str(tls_broker.ca_file)]
    good = _agent(tmp_path, tls_broker, settings.keyring_path, "pi-tls", "s3cret")
    bad = _agent(tmp_path, tls_broker, settings.keyring_path, "pi-bad", "wrong")
    try:
        res = CliRunner().invoke(cli, [*home, "publish", str(fleet_bundles["v1"]), "--device", "pi-tls", *conn])
        assert res.exit_code == 0, res.output
        rows: dict = {}
        end = time.time() + 60
        while time.time() < end and rows.get("pi-tls", {}).get("status") != "installed":
            res = CliRunner().invoke(cli, [*home, "fleet", "devices", "--json", *conn])
            rows = {r["device"]: r for r in json.loads(res.output)}
        assert rows["pi-tls"]["version"] == 1 and rows["pi-tls"]["online"], rows
        assert "pi-bad" not in rows  # refused by the broker
        # the ACL: a device cannot speak for another device (mosquitto drops the publish)
        from agent.fleet.mqtt import Broker, connect_blocking, make_client

        spoof = make_client("spoof", Broker.parse(tls_broker.url, "pi-tls", "s3cret", str(tls_broker.ca_file)))
        connect_blocking(spoof, Broker.parse(tls_broker.url, "pi-tls", "s3cret", str(tls_broker.ca_file)))
        spoof.publish("edgeship/v1/tls/device/victim/reported", json.dumps({"v": 1, "device": "victim"}), qos=1,
                      retain=True).wait_for_publish(5)
        spoof.disconnect()
        spoof.loop_stop()
        res = CliRunner().invoke(cli, [*home, "fleet", "devices", "--json", *conn])
        assert "victim" not in {r["device"] for r in json.loads(res.output)}
        assert bad.poll() is None  # ... and still running (serving its local API, retrying with backoff)
        res = CliRunner().invoke(cli, [*home, "fleet", "devices", "--broker",
                                       tls_broker.host_url.replace("mqtts", "mqtt"), "--fleet", "tls"])
        assert res.exit_code != 0  # plain MQTT to a TLS listener fails with a message, not a hang
    finally:
        for p in (good, bad):
            p.terminate()
            p.wait(30)
    assert "refused" in (tmp_path / "pi-bad.log").read_text().lower()
