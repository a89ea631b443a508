"""`edgeship device enroll`: a device's identity, and the folder that carries it to the device.

The folder holds everything the agent needs and nothing of the host's secrets: ``agent.toml`` (paths in it
are relative to it), the CA certificate that verifies the broker, the device's TLS key and certificate (or its
generated MQTT password), its model key (X25519: opens bundles sealed for it), and what it trusts to sign
updates — the root public key and the current keyring document, or, on a host without a root key, the
signing keys' ``.pub`` files. Keys are 0600 in a 0700 folder that appears complete or not at all (built
beside the target, then renamed). Copy it to the device as it is: ``scp -r DIR pi@device:/etc/edgeship``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.ca import FleetCA
from toolkit.errors import IdentityError
from toolkit.settings import Settings


@dataclass(frozen=True)
class Enrolled:
    name: str
    folder: Path
    auth: str  # cert | password
    model_key_id: str
    trust: str  # "keyring vN (root …)" or "plain keyring (N keys)"
    passwd_line: str = ""  # password auth: the broker's password file line (a hash)


def ca_of(s: Settings) -> FleetCA:
    return FleetCA(s.home / "ca")


def enroll(s: Settings, ca: FleetCA, name: str, group: str, fleet: str, broker: str, out: Path,
           password: bool = False, broker_ca: Path | None = None) -> Enrolled:
    from agent.seal import generate_model_key, model_key_id
    from agent.store import fsync_dir

    out = Path(out)
    if out.exists():
        raise IdentityError(f"{out} already exists; pick another --out (nothing was enrolled)")
    files, trust = _trust_files(s)  # before anything is recorded: a host that cannot provision refuses now
    model_pem, model_pub = generate_model_key()
    files["model.key"] = (model_pem, True)
    files["ca.pem"] = ((broker_ca or ca.ca_pem).read_bytes(), False)
    line = ""
    if password:
        secret, line = ca.enroll_password(name, fleet, group, model_pub)
        files["mqtt.password"] = (f"{secret}\n".encode(), True)
        auth = f'username = "{name}"\npassword_file = "mqtt.password"\n'
    else:
        issued = ca.issue(name, "device", fleet, group, model_key=model_pub)
        files["device.key"] = (issued.key_pem, True)
        files["device.pem"] = (issued.cert_pem, False)
        auth = 'cert_file = "device.pem"\nkey_file = "device.key"\n'
    keyring = 'keyring = "keyring.json"\nroot_key = "root.pub"\n' if "root.pub" in files else 'keyring = "keys"\n'
    files["agent.toml"] = (AGENT_TOML.format(name=name, keyring=keyring, broker=broker, fleet=fleet, group=group,
                                             auth=auth).encode(), False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # 0700
    try:
        for rel, (data, private) in files.items():
            path = tmp / rel
            path.parent.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600 if private else 0o644)
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), 0o600 if private else 0o644)  # whatever the umask says
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        ca.revoke(name)  # no folder, no identity: enroll again
        raise
    return Enrolled(name, out, "password" if password else "cert", model_key_id(model_pub), trust, line)


def _trust_files(s: Settings) -> tuple[dict[str, tuple[bytes, bool]], str]:
    """What the device will trust to sign updates: root.pub + keyring.json, or HOME/keys/*.pub."""
    from toolkit import key_rotation

    if key_rotation.root_pub(s).is_file():
        cur = key_rotation.current(s)
        if cur is None:
            raise IdentityError(f"{s.home} has a root key but no keyring yet: sign the first one "
                                f"(edgeship keys sign-keyring --root-key root.pem), then enroll")
        return ({"root.pub": (key_rotation.root_pub(s).read_bytes(), False), "keyring.json": (cur[1], False)},
                f"keyring v{cur[0].version} signed by the root key")
    pubs = sorted(s.keyring_path.glob("*.pub"))
    if not pubs:
        raise IdentityError(f"{s.keyring_path}: no signing key to trust (edgeship keys generate)")
    return ({f"keys/{p.name}": (p.read_bytes(), False) for p in pubs},
            f"plain keyring of {len(pubs)} key(s): no rotation without a root key (docs/security.md)")


AGENT_TOML = """\
# edgeship-agent configuration of {name}, written by `edgeship device enroll` (docs/security.md).
# Paths are relative to this file: copy the whole folder (scp -r) to /etc/edgeship on the device.
[agent]
device_id = "{name}"
state_dir = "/var/lib/edgeship"
{keyring}model_key = "model.key"          # opens bundles encrypted for this device

[http]
host = "127.0.0.1"                  # local only; see docs/agent.md before binding elsewhere

[mqtt]
broker = "{broker}"
fleet = "{fleet}"
group = "{group}"
ca_file = "ca.pem"
{auth}"""


def describe(rows: list[dict[str, Any]]) -> list[str]:
    import time

    out = [f"{'name':<20} {'kind':<7} {'fleet':<12} {'group':<12} {'auth':<9} {'enrolled':<11} revoked"]
    for r in rows:
        out.append(f"{r['name']:<20} {r['kind']:<7} {r['fleet'] or '-':<12} {r['grp'] or '-':<12} {r['auth']:<9} "
                   f"{time.strftime('%Y-%m-%d', time.localtime(r['enrolled'])):<11} "
                   + (time.strftime('%Y-%m-%d %H:%M', time.localtime(r['revoked'])) if r["revoked"] else "-"))
    return out
