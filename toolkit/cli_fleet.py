"""`edgeship publish | broker | rollout | fleet`: the fleet half of the host CLI (registered on the main group)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import click

from toolkit.errors import ToolkitError
from toolkit.settings import Settings

_MQTT = [
    click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True, envvar="EDGESHIP_BROKER",
                 help="mqtt[s]://host:port [env EDGESHIP_BROKER]."),
    click.option("--fleet", "fleet_name", default="default", show_default=True, help="Fleet name (topic namespace)."),
    click.option("--username", envvar="EDGESHIP_MQTT_USERNAME", help="[env EDGESHIP_MQTT_USERNAME]"),
    click.option("--password", envvar="EDGESHIP_MQTT_PASSWORD",
                 help="[env EDGESHIP_MQTT_PASSWORD] Prefer the environment or --password-file: arguments show in ps."),
    click.option("--password-file", type=click.Path(exists=True, dir_okay=False), envvar="EDGESHIP_MQTT_PASSWORD_FILE",
                 help="Read the password from this file's first line [env EDGESHIP_MQTT_PASSWORD_FILE]."),
    click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), envvar="EDGESHIP_MQTT_CA_FILE",
                 help="CA bundle for mqtts:// [env EDGESHIP_MQTT_CA_FILE]."),
    click.option("--cert-file", type=click.Path(exists=True, dir_okay=False), envvar="EDGESHIP_MQTT_CERT_FILE",
                 help="Client certificate for mutual TLS (edgeship ca host-cert) [env EDGESHIP_MQTT_CERT_FILE]."),
    click.option("--key-file", type=click.Path(exists=True, dir_okay=False), envvar="EDGESHIP_MQTT_KEY_FILE",
                 help="Its private key [env EDGESHIP_MQTT_KEY_FILE]."),
]


def mqtt_options(fn: Callable) -> Callable:
    """Adds the broker options; the command receives ``conn`` (a Broker) and ``fleet_name``."""
    for opt in reversed(_MQTT):
        fn = opt(fn)

    def wrapper(*args: Any, broker: str, username: str | None, password: str | None, password_file: str | None,
                ca_file: str | None, cert_file: str | None, key_file: str | None, **kw: Any) -> Any:
        from agent.config import read_secret
        from agent.fleet.mqtt import Broker

        if password_file:
            if password:
                raise click.UsageError("give --password or --password-file, not both")
            password = read_secret(Path(password_file), "--password-file")
        return fn(*args, conn=Broker.parse(broker, username, password, ca_file, cert_file, key_file), **kw)

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    wrapper.__click_params__ = fn.__click_params__  # type: ignore[attr-defined]
    return wrapper


def emit_json(data: Any) -> None:
    """--json output of every command."""
    import json

    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


_encrypt_option = click.option(
    "--encrypt", is_flag=True, help="Encrypt the model and golden set for the target's enrolled devices (their "
    "model keys, edgeship device enroll): a copy off the broker or a download folder is unreadable without one.")


def _seal(s: Settings, bundle: Path, key: Any, fleet: str, device: str | None = None, group: str | None = None,
          members: list[str] | None = None) -> Any:
    """A sealed copy of ``bundle`` for the enrolled devices of ``fleet`` (a device, or a group; ``members``: who
    must be able to open it), recorded in the registry for deltas."""
    from toolkit.enroll import ca_of
    from toolkit.fleet.sealing import record, seal_bundle

    ca = ca_of(s)
    try:
        recipients = ca.recipients(fleet, group=group, device=device)
        if members:
            enrolled = {r["name"] for r in ca.list(fleet, active=True) if r["model_key"] and r["grp"] == group}
            if missing := sorted(set(members) - enrolled):
                raise ToolkitError(f"cannot encrypt for {', '.join(missing)}: not enrolled in fleet {fleet!r} group "
                                   f"{group!r} with a model key (edgeship device enroll); they could not open it")
    finally:
        ca.close()
    sealed = seal_bundle(bundle, recipients, key, s.home / "sealed")
    record(s.registry_path, sealed, bundle)
    click.echo(f"encrypted {bundle.name} for {sealed.recipients} device(s): {sealed.path}")
    return sealed


@click.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--device", help="Target one device id.")
@click.option("--group", help="Target a device group.")
@mqtt_options
@click.option("--key", type=click.Path(dir_okay=False, path_type=Path), show_default="HOME/keys/signing.pem",
              help="Signing key for the desired state.")
@click.option("--url", default="", show_default="none: MQTT chunks",
              help="Devices download the bundle from this http(s) URL instead of MQTT chunks.")
@click.option("--delta-from", "delta_from", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A bundle devices may be running: also publish a (smaller) patch against its model. Repeatable.")
@_encrypt_option
@click.pass_obj
def publish(s: Settings, bundle: Path, device: str | None, group: str | None, conn: Any, fleet_name: str,
            key: Path | None, url: str, delta_from: tuple[Path, ...], encrypt: bool) -> None:
    """Publish BUNDLE as resumable chunks and set the signed desired state of a device or group."""
    from toolkit.fleet.publish import publish as do_publish
    from toolkit.signing import load_key

    signing = load_key(key or s.key_path)
    sealed = _seal(s, bundle, signing, fleet_name, device=device, group=group) if encrypt else None
    res = do_publish(sealed.path if sealed else bundle, conn, fleet_name, signing, device=device, group=group,
                     url=url, delta_from=list(delta_from), sealed=sealed)
    click.echo(f"published {res['model']} v{res['version']} ({res['chunks']} chunks, sha256 "
               f"{res['sha256'][:12]}…) to {res['target']} on {res['topic']}")
    for base, size in res.get("deltas", {}).items():
        click.echo(f"  delta for devices running bundle base {base[:12]}…: {size} bytes ({size / res['size']:.1%} of the bundle)")


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address.")
@click.option("--port", default=1883, show_default=True, type=int, help="TCP port to listen on.")
def broker(host: str, port: int) -> None:
    """Run the embedded MQTT broker (zero set-up; use Mosquitto/EMQX/HiveMQ in production)."""
    import signal

    from toolkit.fleet.broker import EmbeddedBroker

    eb = EmbeddedBroker(host, port).start()
    click.echo(f"embedded broker on {eb.url} (Ctrl-C to stop)")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        eb.stop()


# ---------------------------------------------------------------- rollout
def _rollouts(s: Settings, conn: Any, fleet_name: str, signing: Any, fleet_db: Path | None = None):
    """The rollout driver (start, resume): it publishes, so it needs the broker and the signing key."""
    from toolkit.fleet.publish import Publisher
    from toolkit.fleet.rollout import Rollouts

    s.home.mkdir(parents=True, exist_ok=True)
    return Rollouts(s.registry_path, conn, fleet_name, lambda: Publisher(conn, fleet_name, signing),
                    echo=click.echo, fleet_db=fleet_db or s.home / "fleet.db")


def _registry(s: Settings):
    """The rollouts in the registry, for the commands that only read it or change a state (status, abort):
    no broker, no signing key."""
    from toolkit.fleet.rollout import Rollouts

    if not s.registry_path.is_file():
        raise ToolkitError(f"{s.registry_path}: no registry there, so no rollouts (check --home)")
    return Rollouts(s.registry_path)


def rollout_options(fn: Callable) -> Callable:
    fn = click.option("--key", type=click.Path(dir_okay=False, path_type=Path), show_default="HOME/keys/signing.pem",
                      help="Signing key for the desired states.")(fn)
    return mqtt_options(fn)


@click.group()
def rollout() -> None:
    """Staged rollouts to a device group (state kept in the registry)."""


def _show(r: dict[str, Any]) -> None:
    plan = r["plan"]
    click.echo(f"rollout {r['id']}: {r['model']} v{r['version']} -> group {r['grp']}: {r['state']} "
               f"(wave {min(plan['wave'] + 1, len(plan['waves']))}/{len(plan['waves'])})"
               + (f"\n  {r['error']}" if r.get("error") else ""))
    for dev, res in sorted(plan["results"].items()):
        click.echo(f"  {dev:<16} {res}")
    for dev in plan.get("offline", []):
        click.echo(f"  {dev:<16} offline at the start: converges to the group's desired state when it connects")


@rollout.command("start")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--group", required=True, help="The device group to update.")
@click.option("--canary", default="10%", show_default=True, help="Size of the first wave, e.g. 10%.")
@click.option("--max-failures", default=0, show_default=True, help="Failures tolerated per wave before halting.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds a wave may take to install.")
@click.option("--observe", default=0.0, show_default=True,
              help="Seconds of telemetry to watch after a wave installs (0: install results only).")
@click.option("--max-error-increase", default=0.02, show_default=True,
              help="Halt when the wave's error rate exceeds the control's (same model and group on the replaced "
                   "version) by more than this.")
@click.option("--max-p95-increase", default=0.25, show_default=True,
              help="Halt when the wave's p95 latency exceeds the control's by more than this fraction...")
@click.option("--min-p95-increase-ms", default=1.0, show_default=True,
              help="...and by at least this many milliseconds (sub-millisecond p95s jitter by more than 25%).")
@click.option("--max-class-psi", default=0.25, show_default=True,
              help="Halt when the wave's predicted-class distribution differs from the control's by more than "
                   "this PSI.")
@click.option("--max-input-psi-increase", default=0.25, show_default=True,
              help="Halt when the wave's inputs are further from the new model's reference statistics than the "
                   "control's from theirs by more than this PSI.")
@click.option("--max-accuracy-drop", default=0.05, show_default=True,
              help="Halt when the wave's live accuracy (from field labels) is below the control's by more than this.")
@click.option("--min-labels", default=50, show_default=True,
              help="Labelled samples needed on each side before live accuracy is compared.")
@click.option("--delta-from", "delta_from", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Extra base bundles for delta patches (bundles in the registry are found automatically).")
@click.option("--fleet-db", type=click.Path(dir_okay=False, path_type=Path), show_default="HOME/fleet.db",
              help="Telemetry database the observation window is collected into.")
@_encrypt_option
@rollout_options
@click.pass_obj
def rollout_start(s: Settings, bundle: Path, group: str, canary: str, max_failures: int, timeout: float,
                  observe: float, max_error_increase: float, max_p95_increase: float, min_p95_increase_ms: float,
                  max_class_psi: float, max_input_psi_increase: float, max_accuracy_drop: float, min_labels: int,
                  delta_from: tuple[Path, ...], fleet_db: Path | None, encrypt: bool, conn: Any,
                  fleet_name: str, key: Path | None) -> None:
    """Canary wave, then the rest; halt and roll the wave back when devices fail or get worse."""
    from toolkit.fleet.rollout import Thresholds

    try:
        pct = float(canary.rstrip("%"))
    except ValueError as exc:
        raise click.BadParameter(f"{canary!r} is not a percentage", param_hint="--canary") from exc
    th = Thresholds(max_error_increase, max_p95_increase, max_class_psi, max_input_psi_increase, max_accuracy_drop,
                    min_labels, min_p95_increase_ms)
    from toolkit.signing import load_key

    signing = load_key(key or s.key_path)
    seal = (lambda members: _seal(s, bundle, signing, fleet_name, group=group, members=members)) if encrypt else None
    r = _rollouts(s, conn, fleet_name, signing, fleet_db).start(bundle, group, pct, max_failures, timeout, observe,
                                                                th, list(delta_from), seal)
    _show(r)
    if r["state"] != "completed":
        raise ToolkitError(f"rollout {r['id']} {r['state']}")


_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


@rollout.command("status")
@click.argument("rollout_id", type=int, required=False)
@_json_option
@click.pass_obj
def rollout_status(s: Settings, rollout_id: int | None, as_json: bool) -> None:
    """Show one rollout, or all (from the registry: no broker, no key)."""
    ro = _registry(s)
    rows = [ro.get(rollout_id)] if rollout_id else ro.list()
    if as_json:
        return emit_json(rows)
    for r in rows:
        _show(r)


@rollout.command("resume")
@click.argument("rollout_id", type=int)
@rollout_options
@click.pass_obj
def rollout_resume(s: Settings, rollout_id: int, conn: Any, fleet_name: str, key: Path | None) -> None:
    """Continue a running rollout after the host process stopped."""
    from toolkit.signing import load_key

    _show(_rollouts(s, conn, fleet_name, load_key(key or s.key_path)).resume(rollout_id))


@rollout.command("abort")
@click.argument("rollout_id", type=int)
@click.pass_obj
def rollout_abort(s: Settings, rollout_id: int) -> None:
    """Stop a rollout (devices keep what they have; the running driver stops within a poll). Registry only:
    no broker, no key."""
    _show(_registry(s).abort(rollout_id))


# ---------------------------------------------------------------- fleet
@click.group()
def fleet() -> None:
    """Fleet state and telemetry: devices, collect, status, watch, report."""


@fleet.command("devices")
@mqtt_options
@_json_option
def fleet_devices(conn: Any, fleet_name: str, as_json: bool) -> None:
    """Devices with group, model version, update status, online/offline and last report (live from the broker)."""
    from toolkit.fleet.watcher import devices

    rows = devices(conn, fleet_name)
    if as_json:
        return emit_json(rows)
    click.echo(f"{'device':<16} {'group':<12} {'model':<14} {'ver':>4} {'status':<12} {'online':<7} last report")
    for r in rows:
        when = time.strftime("%H:%M:%S", time.localtime(r["t"])) if r.get("t") else "-"
        click.echo(f"{r['device']:<16} {r.get('group') or '-':<12} {r.get('model') or '-':<14} "
                   f"{r.get('version') or '-':>4} {r.get('status') or '-':<12} "
                   f"{'yes' if r['online'] else 'no':<7} {when}  {r.get('error') or ''}")


_db_option = click.option("--db", "db_path", type=click.Path(dir_okay=False, path_type=Path),
                          show_default="HOME/fleet.db", help="Telemetry database (written by `fleet collect`).")


@fleet.command("collect")
@mqtt_options
@_db_option
@click.option("--share", help="Join shared subscription group NAME: run several collectors to split the load.")
@click.option("--client-id", show_default="edgeship-collector-HOSTNAME-FLEET(-SHARE)",
              help="MQTT client id; the broker queues telemetry for it while it is down.")
@click.option("--retention-days", default=30.0, show_default=True, help="Delete telemetry older than this.")
@click.option("--capture-retention-days", default=30.0, show_default=True,
              help="Delete captured predictions and field labels collected longer ago than this.")
@click.option("--seconds", type=float, show_default="until Ctrl-C", help="Stop after this many seconds.")
@click.pass_obj
def fleet_collect(s: Settings, conn: Any, fleet_name: str, db_path: Path | None, share: str | None,
                  client_id: str | None, retention_days: float, capture_retention_days: float,
                  seconds: float | None) -> None:
    """Store all telemetry, device state, captured predictions and field labels in SQLite (WAL)."""
    import socket

    from toolkit.fleet.collector import Collector

    path = db_path or s.home / "fleet.db"
    cid = client_id or f"edgeship-collector-{socket.gethostname()}-{fleet_name}" + (f"-{share}" if share else "")
    col = Collector(conn, fleet_name, path, share, cid, retention_days, capture_retention_days).start()
    click.echo(f"collecting fleet {fleet_name!r} from {conn.host}:{conn.port} into {path}"
               + (f" (shared group {share})" if share else "") + "; Ctrl-C to stop")
    run_for(seconds, col.stop)
    click.echo(f"stored {col.stored} message(s), rejected {col.rejected}")


def run_for(seconds: float | None, stop: Callable[[], None]) -> None:
    """Let a service run for ``seconds`` (None: until Ctrl-C), then ``stop`` it."""
    try:
        if seconds is not None:
            time.sleep(seconds)
        else:
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()


_window_option = click.option("--window", default=300.0, show_default=True,
                              help="Seconds of telemetry behind every number (requests, p95, error rate, drift).")


@fleet.command("status")
@_db_option
@_window_option
@_json_option
@click.option("--versions", "by_version", is_flag=True,
              help="Only the per-version table (live accuracy, confidence, classes); with --json, its rows.")
@click.pass_obj
def fleet_status(s: Settings, db_path: Path | None, window: float, as_json: bool, by_version: bool) -> None:
    """Per device: group, online, model version, p95, error rate, drift, last seen; per version: live accuracy
    from field labels, confidence histogram, predicted classes (from the collector's database)."""
    from toolkit.fleet.collector import open_db
    from toolkit.fleet.views import status, table, version_table, versions

    db = open_db(db_path or s.home / "fleet.db", must_exist=True)
    try:
        rows = [] if by_version else status(db, window)
        vrows = versions(db, window) if by_version or not as_json else []
    finally:
        db.close()
    if as_json:
        return emit_json(vrows if by_version else rows)
    click.echo(version_table(vrows) if by_version else table(rows, window=window) + "\n\n" + version_table(vrows))


@fleet.command("watch")
@_db_option
@_window_option
@click.option("--interval", default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option("--iterations", default=0, show_default="0: until Ctrl-C", help="Stop after this many refreshes.")
@click.pass_obj
def fleet_watch(s: Settings, db_path: Path | None, window: float, interval: float, iterations: int) -> None:
    """Live fleet status, refreshed (run `edgeship fleet collect` alongside). Ctrl-C to stop."""
    from toolkit.fleet.collector import open_db
    from toolkit.fleet.views import status, table

    db = open_db(db_path or s.home / "fleet.db", must_exist=True)
    n = 0
    try:
        while not iterations or n < iterations:
            if n:
                time.sleep(interval)
            click.clear()
            click.echo(f"edgeship fleet — {time.strftime('%H:%M:%S')} (every {interval:g}s, Ctrl-C to stop)\n")
            click.echo(table(status(db, window), window=window))
            n += 1
    except KeyboardInterrupt:
        pass
    finally:
        db.close()


@fleet.command("report")
@_db_option
@click.option("--window", default=3600.0, show_default=True,
              help="Seconds of telemetry the report covers (its table and every plot).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("fleet-report.html"),
              show_default=True, help="HTML file to write.")
@click.pass_obj
def fleet_report(s: Settings, db_path: Path | None, window: float, out: Path) -> None:
    """HTML report: latency per version over time, throughput, errors, rollout progress, drift."""
    from toolkit.fleet.views import write_report

    click.echo(f"report: {write_report(db_path or s.home / 'fleet.db', out, window)}")


@fleet.command("acl")
@click.option("--fleet", "fleet_name", default="default", show_default=True, help="Fleet name (topic namespace).")
@click.option("--devices", "inventory", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Inventory: one 'DEVICE [GROUP]' per line.")
@click.option("--device", "device_args", multiple=True, help="DEVICE or DEVICE=GROUP (repeatable).")
@click.option("--enrolled", is_flag=True,
              help="The devices and host identities enrolled in HOME/ca for this fleet (revoked ones left out).")
@click.option("--host-user", default="edgeship-host", show_default=True, help="Username of the host tools.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), show_default="stdout",
              help="Write the ACL to this file.")
@click.pass_obj
def fleet_acl(s: Settings, fleet_name: str, inventory: Path | None, device_args: tuple[str, ...], enrolled: bool,
              host_user: str, out: Path | None) -> None:
    """Write the broker ACL (Mosquitto acl_file) that scopes each device to its fleet and group."""
    from agent.store import atomic_write
    from toolkit.fleet.acl import read_inventory, render

    devices = read_inventory(inventory) if inventory else {}
    hosts = [host_user]
    if enrolled:
        from toolkit.enroll import ca_of

        ca = ca_of(s)
        rows = ca.list(fleet_name, active=True)
        ca.close()
        devices.update({r["name"]: r["grp"] for r in rows if r["kind"] == "device"})
        hosts += [r["name"] for r in rows if r["kind"] == "host" and r["name"] != host_user]
    for arg in device_args:
        dev, _, grp = arg.partition("=")
        devices[dev] = grp
    if not devices:
        raise click.UsageError("name the devices with --devices FILE, --device ID[=GROUP] or --enrolled")
    text = render(fleet_name, devices, hosts)
    if out is None:
        click.echo(text, nl=False)
    else:
        atomic_write(out, text.encode())
        click.echo(f"wrote {out}: {len(devices)} device(s) of fleet {fleet_name!r}")


@fleet.command("refresh")
@mqtt_options
@click.option("--key", type=click.Path(dir_okay=False, path_type=Path), show_default="HOME/keys/signing.pem",
              help="Signing key for the renewed desired states.")
@click.option("--ttl", default=7 * 86400.0, show_default=True, help="Seconds a renewed desired state stays valid.")
@click.option("--all", "renew_all", is_flag=True, help="Renew every desired state, not only those past half their TTL.")
@_json_option
@click.pass_obj
def fleet_refresh(s: Settings, conn: Any, fleet_name: str, key: Path | None, ttl: float, renew_all: bool,
                  as_json: bool) -> None:
    """Renew the fleet's retained desired states before they expire (run it daily; docs/security.md)."""
    from toolkit.fleet.refresh import refresh
    from toolkit.key_rotation import trusted
    from toolkit.signing import load_key

    rows = refresh(conn, fleet_name, load_key(key or s.key_path), trusted(s), ttl, float("inf") if renew_all else None)
    if as_json:
        return emit_json(rows)
    for r in rows:
        when = time.strftime(" until %Y-%m-%d %H:%M", time.localtime(r["expires"])) if r.get("expires") else ""
        click.echo(f"{r['topic']}: {r['action']}{when}")
    click.echo(f"{sum(r['action'] == 'renewed' for r in rows)} of {len(rows)} desired state(s) renewed")


def register(cli: click.Group) -> None:
    for cmd in (publish, broker, rollout, fleet):
        cli.add_command(cmd)
