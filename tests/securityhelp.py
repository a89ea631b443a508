"""Helpers for the security tests: a host HOME with a root key, a signed keyring and a fleet CA, device
folders from `edgeship device enroll`, and Mosquitto running deploy/mosquitto/edgeship.conf (mutual TLS)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from click.testing import CliRunner

from agentproc import ROOT, agent_cmd, agent_env
from mosquitto import Mosquitto
from toolkit.cli import cli
from toolkit.settings import Settings

FLEET = "sec"


def edgeship(home: Path, *args: str, ok: bool = True):
    """`edgeship --home HOME ARGS` in this process; asserts success unless ``ok`` is False."""
    res = CliRunner().invoke(cli, ["--home", str(home), *map(str, args)])
    if ok:
        assert res.exit_code == 0, (args, res.output, res.exception)
    return res


class SecureHome:
    """A host HOME whose signing key is the tests' session key, with an offline-style root key (root.pem kept
    outside HOME), the first keyring signed, a fleet CA, the broker's server certificate and a host identity."""

    def __init__(self, folder: Path, signing_key):
        self.home = folder / "home"
        self.settings = Settings(self.home)
        keys = self.home / "keys"
        keys.mkdir(parents=True)
        shutil.copy(signing_key.path, keys / "signing.pem")
        shutil.copy(signing_key.path.with_suffix(".pub"), keys / "signing.pub")
        self.root_dir = folder / "offline"
        edgeship(self.home, "keys", "root-init", "--out", self.root_dir)
        self.root_key = self.root_dir / "root.pem"
        edgeship(self.home, "keys", "sign-keyring", "--root-key", self.root_key)
        self.certs = folder / "certs"
        edgeship(self.home, "ca", "server-cert", "localhost", "--ip", "127.0.0.1", "-o", self.certs)
        self.host_dir = folder / "host-id"
        edgeship(self.home, "ca", "host-cert", "edgeship-host", "-o", self.host_dir)
        self.devices = folder / "devices"

    def enroll(self, name: str, group: str, broker_url: str, *extra: str, fleet: str = FLEET) -> Path:
        out = self.devices / name
        edgeship(self.home, "device", "enroll", name, "--group", group, "--fleet", fleet, "--broker", broker_url,
                 "-o", out, *extra)
        return out

    def acl(self) -> Path:
        out = self.home / "edgeship.acl"
        edgeship(self.home, "fleet", "acl", "--fleet", FLEET, "--enrolled", "-o", out)
        return out

    def host_conn(self, broker: Mosquitto) -> list[str]:
        """The host tools' broker options: the host listener, the host certificate."""
        return ["--broker", broker.host_url, "--fleet", FLEET, "--ca-file", str(self.host_dir / "ca.pem"),
                "--cert-file", str(self.host_dir / "host.pem"), "--key-file", str(self.host_dir / "host.key")]

    def devices_json(self, broker: Mosquitto) -> dict[str, dict]:
        res = edgeship(self.home, "fleet", "devices", "--json", *self.host_conn(broker))
        return {r["device"]: r for r in json.loads(res.output)}


def mtls_broker(secure: SecureHome) -> Mosquitto:
    """Mosquitto with the shipped mutual-TLS configuration and the ACL of the enrolled identities."""
    folder = Path(tempfile.mkdtemp(prefix="edgeship-mosq-mtls-"))
    return Mosquitto(folder, certs=secure.certs, acl_file=secure.acl()).start()


def device_agent(folder: Path, state_dir: Path, log: Path, broker: Mosquitto | None = None) -> subprocess.Popen:
    """`edgeship-agent run --config FOLDER/agent.toml` (a device folder as enrollment wrote it), with the test's
    state dir, a free HTTP port, and the broker's test port in place of the URL given at enrollment."""
    env = agent_env(EDGESHIP_AGENT_STATE_DIR=str(state_dir), EDGESHIP_AGENT_HTTP_PORT="0",
                    EDGESHIP_AGENT_HEARTBEAT="3600")
    if broker is not None:
        env["EDGESHIP_AGENT_MQTT_BROKER"] = broker.url
    with open(log, "ab") as out:
        return subprocess.Popen(agent_cmd("run", "--config", str(folder / "agent.toml")), cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
