"""`edgeship device | ca` and the key-lifecycle half of `edgeship keys` (registered on the main group).

docs/security.md explains the threat model these commands serve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from toolkit.cli_fleet import emit_json, mqtt_options
from toolkit.errors import ToolkitError
from toolkit.settings import Settings


# ---------------------------------------------------------------- device identities
@click.group()
def device() -> None:
    """Device identities: enroll (certificate or password, model key, device folder), list, revoke."""


@device.command("enroll")
@click.argument("name")
@click.option("--group", required=True, help="The device's group.")
@click.option("--fleet", "fleet_name", default="default", show_default=True, help="Fleet name (topic namespace).")
@click.option("--broker", required=True, envvar="EDGESHIP_DEVICE_BROKER",
              help="The URL devices connect to, e.g. mqtts://broker.example.com:8883 [env EDGESHIP_DEVICE_BROKER].")
@click.option("--password", "use_password", is_flag=True,
              help="A generated MQTT password instead of a client certificate (brokers without TLS client auth).")
@click.option("--broker-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              show_default="the fleet CA", help="CA certificate that verifies the broker's server certificate.")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), show_default="HOME/devices/NAME",
              help="The device folder to write (must not exist).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def device_enroll(s: Settings, name: str, group: str, fleet_name: str, broker: str, use_password: bool,
                  broker_ca: Path | None, out: Path | None, as_json: bool) -> None:
    """Issue NAME's identity from the fleet CA and write its device folder (copy it with scp -r)."""
    from toolkit.enroll import ca_of, enroll

    ca = ca_of(s)
    try:
        e = enroll(s, ca, name, group, fleet_name, broker, out or s.home / "devices" / name, use_password, broker_ca)
    finally:
        ca.close()
    if as_json:
        return emit_json({k: str(v) for k, v in e.__dict__.items()})
    click.echo(f"enrolled {name} ({e.auth}, fleet {fleet_name!r}, group {group!r}); model key {e.model_key_id}; "
               f"trusts {e.trust}\ndevice folder: {e.folder}  (scp -r {e.folder} DEVICE:/etc/edgeship)")
    if e.passwd_line:
        click.echo(f"broker password file: {ca.passwd_path} (its line for {name} is a hash; the password is only "
                   f"in the device folder)")


@device.command("list")
@click.option("--fleet", "fleet_name", help="Only this fleet's devices (hosts and servers are always shown).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def device_list(s: Settings, fleet_name: str | None, as_json: bool) -> None:
    """Every identity the fleet CA issued: devices, hosts, the broker; revoked ones with the date."""
    from toolkit.enroll import ca_of, describe

    ca = ca_of(s)
    rows = ca.list(fleet_name)
    ca.close()
    if as_json:
        return emit_json(rows)
    click.echo("\n".join(describe(rows)))


@device.command("revoke")
@click.argument("name")
@click.pass_obj
def device_revoke(s: Settings, name: str) -> None:
    """Revoke NAME's identity: its certificate goes into the CRL (its password out of the password file)."""
    from toolkit.enroll import ca_of

    ca = ca_of(s)
    try:
        row = ca.revoke(name)
    finally:
        ca.close()
    passwd = f" and {ca.passwd_path} as its password_file" if row["auth"] == "password" else ""
    click.echo(f"revoked {name} ({row['kind']}, {row['auth']}). On the broker: install {ca.crl_path} as its "
               f"crlfile{passwd}, "
               f"write the ACL without {name} (edgeship fleet acl --enrolled), then `systemctl reload mosquitto`: "
               f"its new connections are refused, and its open one can no longer read or write a topic. "
               f"(docs/security.md)")


# ---------------------------------------------------------------- the CA
@click.group()
def ca() -> None:
    """The fleet CA (HOME/ca): the broker's server certificate, host identities, the CRL."""


def _write_pair(out: Path, stem: str, issued: Any, ca_pem: Path) -> None:
    import shutil

    from agent.store import atomic_write
    from toolkit.signing import write_private

    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(out / f"{stem}.key", issued.key_pem)
    atomic_write(out / f"{stem}.pem", issued.cert_pem, public=True)
    shutil.copyfile(ca_pem, out / "ca.pem")


@ca.command("server-cert")
@click.argument("hostname")
@click.option("--ip", "ips", multiple=True, help="An IP address the broker is reached at (repeatable).")
@click.option("--dns", "dns", multiple=True, show_default="HOSTNAME", help="A DNS name (repeatable).")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for server.key, server.pem, ca.pem and crl.pem (Mosquitto's keyfile, certfile, cafile and "
                   "crlfile).")
@click.pass_obj
def ca_server_cert(s: Settings, hostname: str, ips: tuple[str, ...], dns: tuple[str, ...], out: Path) -> None:
    """The broker's TLS server certificate, from the fleet CA."""
    from toolkit.enroll import ca_of

    c = ca_of(s)
    try:
        _write_pair(out, "server", c.issue(hostname, "server", dns=dns or (hostname,), ips=ips), c.ca_pem)
        c.write_crl(out / "crl.pem")
    finally:
        c.close()
    click.echo(f"wrote {out}/server.key, server.pem, ca.pem and crl.pem (deploy/mosquitto/edgeship.conf)")


@ca.command("host-cert")
@click.argument("name", default="edgeship-host")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), show_default="HOME/ca/hosts/NAME",
              help="Folder for host.key, host.pem and ca.pem.")
@click.pass_obj
def ca_host_cert(s: Settings, name: str, out: Path | None) -> None:
    """A host-tools identity (client certificate, common name NAME) for the broker's host listener."""
    from toolkit.enroll import ca_of

    c = ca_of(s)
    out = out or s.home / "ca" / "hosts" / name
    try:
        _write_pair(out, "host", c.issue(name, "host"), c.ca_pem)
    finally:
        c.close()
    click.echo(f"host identity {name}: {out}/host.pem + host.key (export EDGESHIP_MQTT_CERT_FILE={out}/host.pem "
               f"EDGESHIP_MQTT_KEY_FILE={out}/host.key EDGESHIP_MQTT_CA_FILE={out}/ca.pem)")


@ca.command("crl")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), show_default="HOME/ca/crl.pem",
              help="Where to write the certificate revocation list (the broker's crlfile).")
@click.pass_obj
def ca_crl(s: Settings, out: Path | None) -> None:
    """Issue a fresh CRL (every revoked certificate; valid two years)."""
    from toolkit.enroll import ca_of

    c = ca_of(s)
    try:
        click.echo(f"wrote {c.write_crl(out)}")
    finally:
        c.close()


# ---------------------------------------------------------------- keys (root, keyring, rotation)
@click.command("root-init")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for root.pem (the root private key: keep it offline) and root.pub.")
@click.pass_obj
def keys_root_init(s: Settings, out: Path) -> None:
    """Create the fleet's root key (run it on an offline machine; docs/security.md)."""
    from toolkit.key_rotation import root_init, root_pub

    k = root_init(s, out)
    click.echo(f"root key {k.key_id}: private {k.path} (move it offline), public {k.path.with_suffix('.pub')}; "
               f"this host trusts it via {root_pub(s)}")


def _root_option(fn: Any) -> Any:
    return click.option("--root-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                        help="The root private key (root.pem), when it is at hand; without it a request is written "
                             "to sign where the root key is.")(fn)


_expires = click.option("--expires-days", default=365.0, show_default=True, help="Days the keyring stays valid.")
_no_publish = click.option("--no-publish", is_flag=True, help="Sign and install, but do not publish to the broker.")


def _finish(s: Settings, req: dict[str, Any], root_key: Path | None, publish: bool, conn: Any, fleet: str) -> None:
    """Sign ``req`` with the root key (or save it as a request), install it here and publish it."""
    from toolkit import key_rotation as kr
    from toolkit.signing import load_key

    if root_key is None:
        path = kr.save_request(s, req)
        click.echo(f"keyring request v{req['version']}: {path}\n  sign it where the root key is: edgeship keys "
                   f"sign-keyring {path.name} --root-key root.pem -o keyring.json\n  then here: edgeship keys "
                   f"publish-keyring keyring.json")
        return
    payload = kr.sign(req, load_key(root_key))
    doc = kr.install(s, payload)
    click.echo(f"{kr.describe(doc)} -> {kr.keyring_path(s)}")
    if publish:
        _publish(payload, conn, fleet, kr.keyring_path(s))


def _publish(payload: bytes, conn: Any, fleet: str, path: Path) -> None:
    from agent.errors import AgentError
    from toolkit import key_rotation as kr

    try:
        topic = kr.publish(payload, conn, fleet)
    except AgentError as exc:
        raise ToolkitError(f"{exc}; the keyring is saved in {path}: publish it with `edgeship keys "
                           f"publish-keyring`") from exc
    click.echo(f"published on {topic} (retained)")


@click.command("sign-keyring")
@click.argument("request", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=False)
@click.option("--root-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The root private key (root.pem); without it, the request is written to sign where it is.")
@_expires
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
              show_default="install it in HOME/keys/keyring.json", help="Write the signed keyring here instead.")
@click.pass_obj
def keys_sign_keyring(s: Settings, request: Path | None, root_key: Path | None, expires_days: float,
                      out: Path | None) -> None:
    """Sign a keyring REQUEST with the root key (without REQUEST: the next version of this host's keyring,
    e.g. the first one, or the same keys with a later expiry)."""
    from agent.store import atomic_write
    from toolkit import key_rotation as kr
    from toolkit.signing import load_key

    req = kr.load_request(request) if request else kr.request(s, expires_days=expires_days)
    if root_key is None:
        return _finish(s, req, None, False, None, "")
    payload = kr.sign(req, load_key(root_key))
    if out is not None:
        atomic_write(out, payload, public=True)
        click.echo(f"signed keyring v{req['version']}: {out}")
    else:
        click.echo(f"{kr.describe(kr.install(s, payload))} -> {kr.keyring_path(s)}")


@click.command("publish-keyring")
@click.argument("keyring_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=False)
@mqtt_options
@click.pass_obj
def keys_publish_keyring(s: Settings, keyring_file: Path | None, conn: Any, fleet_name: str) -> None:
    """Install a signed keyring here (when newer) and publish it, retained, to the fleet's devices."""
    from toolkit import key_rotation as kr

    payload = (keyring_file or kr.keyring_path(s)).read_bytes()
    click.echo(f"{kr.describe(kr.install(s, payload))} -> {kr.keyring_path(s)}")
    _publish(payload, conn, fleet_name, kr.keyring_path(s))


@click.command("rotate")
@_root_option
@_expires
@_no_publish
@mqtt_options
@click.pass_obj
def keys_rotate(s: Settings, root_key: Path | None, expires_days: float, no_publish: bool, conn: Any,
                fleet_name: str) -> None:
    """A new signing key and the keyring that trusts it beside the current one; signed with --root-key and
    published (then renew desired states with `edgeship fleet refresh` and revoke the old key)."""
    from toolkit import key_rotation as kr

    new, req = kr.rotate(s, expires_days)
    click.echo(f"new signing key {new.key_id} (used once the keyring that trusts it is installed)")
    _finish(s, req, root_key, not no_publish, conn, fleet_name)


@click.command("revoke")
@click.argument("key_id")
@_root_option
@_expires
@_no_publish
@mqtt_options
@click.pass_obj
def keys_revoke(s: Settings, key_id: str, root_key: Path | None, expires_days: float, no_publish: bool, conn: Any,
                fleet_name: str) -> None:
    """Stop trusting signing key KEY_ID: a keyring without it, signed with --root-key and published. Devices
    refuse what it signed from the moment they have that keyring."""
    from toolkit import key_rotation as kr
    from toolkit.signing import load_key

    if s.key_path.exists() and load_key(s.key_path).key_id == key_id:
        raise ToolkitError(f"{key_id} is this host's signing key: rotate first (edgeship keys rotate)")
    _finish(s, kr.request(s, revoke=[key_id], expires_days=expires_days), root_key, not no_publish, conn,
            fleet_name)


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def keys_list(s: Settings, as_json: bool) -> None:
    """The signing key, the keys waiting or retired, and the keyring devices trust."""
    from toolkit import key_rotation as kr
    from toolkit.signing import load_key

    def ids(folder: Path) -> list[str]:
        return [load_key(p).key_id for p in sorted(folder.glob("*.pem"))] if folder.is_dir() else []

    cur = kr.current(s)
    doc = {"signing": load_key(s.key_path).key_id if s.key_path.exists() else None,
           "next": ids(s.keyring_path / "next"), "retired": ids(s.keyring_path / "retired"),
           "root": next(iter(kr.root_keyring(s).keys)) if kr.root_pub(s).exists() else None,
           "keyring": {"version": cur[0].version, "keys": sorted(cur[0].keys), "revoked": list(cur[0].revoked),
                       "expires": cur[0].expires} if cur else None}
    if as_json:
        return emit_json(doc)
    click.echo(f"signing key  {doc['signing'] or '-'}")
    for what in ("next", "retired"):
        if doc[what]:
            click.echo(f"{what:<12} {', '.join(doc[what])}")
    click.echo(f"root key     {doc['root'] or '- (no root: devices get a plain keyring)'}")
    click.echo(kr.describe(cur[0]) if cur else "keyring      - (edgeship keys sign-keyring --root-key root.pem)")


def register(cli: click.Group) -> None:
    cli.add_command(device)
    cli.add_command(ca)
    keys = cli.commands["keys"]
    for cmd in (keys_root_init, keys_sign_keyring, keys_publish_keyring, keys_rotate, keys_revoke, keys_list):
        keys.add_command(cmd)  # type: ignore[attr-defined]
