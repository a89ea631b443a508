"""`edgeship capture list | export | purge | request`: the captured field data in the fleet database
(collected by `edgeship fleet collect`) and the host's capture requests to devices."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from toolkit.cli_fleet import emit_json, mqtt_options, run_for
from toolkit.settings import Settings

_db_option = click.option("--db", "db_path", type=click.Path(dir_okay=False, path_type=Path),
                          show_default="HOME/fleet.db", help="Fleet database (written by `fleet collect`).")


def parse_time(text: str | None, option: str) -> float | None:
    """Seconds since the epoch from an ISO date/time (2026-11-27, 2026-11-27T12:00) or a number."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError as exc:
        raise click.BadParameter(f"{text!r}: expected an ISO date/time (2026-11-27T12:00) or seconds since the "
                                 "epoch", param_hint=option) from exc


def _open(s: Settings, db_path: Path | None):
    from toolkit.fleet.collector import open_db

    return open_db(db_path or s.home / "fleet.db", must_exist=True)


@click.group()
def capture() -> None:
    """Captured predictions and field labels: list, export as build data, purge; ask devices to capture."""


@capture.command("list")
@_db_option
@click.option("--device", help="Only this device.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def capture_list(s: Settings, db_path: Path | None, device: str | None, as_json: bool) -> None:
    """Captured records per device, model version and reason: count, samples, labels, size, time range."""
    from toolkit.capture.store import summary

    db = _open(s, db_path)
    try:
        rows = summary(db, device)
    finally:
        db.close()
    if as_json:
        return emit_json(rows)
    head = (f"{'device':<16} {'model':<14} {'reasons':<24} {'records':>7} {'samples':>7} {'labelled':>8} "
            f"{'bytes':>9} {'raw bytes':>9}  first .. last")
    click.echo(head + "\n" + "-" * len(head))
    for r in rows:
        span = f"{_t(r['first'])} .. {_t(r['last'])}"
        click.echo(f"{r['device']:<16} {r['model'] + '@' + str(r['version']):<14} {r['reasons'] or '-':<24} "
                   f"{r['records']:>7} {r['samples']:>7} {r['labelled']:>8} {r['bytes']:>9} {r['raw_bytes']:>9}  "
                   f"{span}")
    drops = {r["device"]: (r["dropped"], r["over_budget"]) for r in rows if r["dropped"] or r["over_budget"]}
    for dev, (dropped, over) in sorted(drops.items()):
        click.echo(f"{dev}: {dropped} record(s) dropped on the device (queue full), {over} not captured "
                   "(daily byte budget reached)")
    click.echo(f"{sum(r['records'] for r in rows)} record(s), {sum(r['bytes'] for r in rows)} bytes")


def _t(x: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(x)) if x else "-"


@capture.command("export")
@_db_option
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .npz to write (edgeship build --calibration/--validation/--train takes it).")
@click.option("--model", help="Model name (needed when several models were captured).")
@click.option("--version", type=int, help="Only records answered by this model version.")
@click.option("--reason", type=click.Choice(["rate", "low-confidence", "drift", "requested"]),
              help="Only records captured for this reason.")
@click.option("--device", help="Only this device's records.")
@click.option("--since", help="Only records captured at or after this time (ISO date/time or epoch seconds).")
@click.option("--until", help="Only records captured before this time.")
@click.option("--labelled", is_flag=True, help="Only records with field labels (the file then has labels y).")
@click.option("--json", "as_json", is_flag=True, help="Print the provenance written into the file as JSON.")
@click.pass_obj
def capture_export(s: Settings, db_path: Path | None, out: Path, model: str | None, version: int | None,
                   reason: str | None, device: str | None, since: str | None, until: str | None, labelled: bool,
                   as_json: bool) -> None:
    """Write captured inputs (and labels y where feedback covers every sample) as an .npz for `edgeship build`."""
    from toolkit.capture.export import export

    db = _open(s, db_path)
    try:
        prov = export(db, out, labelled, model=model, version=version, reason=reason, device=device,
                      since=parse_time(since, "--since"), until=parse_time(until, "--until"))
    finally:
        db.close()
    if as_json:
        return emit_json(prov)
    click.echo(f"wrote {out}: {prov['samples']} sample(s) of {prov['model']} v{'/v'.join(map(str, prov['versions']))} "
               f"from {len(prov['devices'])} device(s), reasons {prov['reasons']}; labels y: "
               f"{'yes' if prov['labels'] else 'no (' + str(prov['labelled_records']) + ' of ' + str(prov['records']) + ' records labelled; --labelled exports only those)'}")


@capture.command("purge")
@_db_option
@click.option("--before", help="Only records collected before this time (ISO date/time or epoch seconds).")
@click.option("--device", help="Only this device's records.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def capture_purge(s: Settings, db_path: Path | None, before: str | None, device: str | None, yes: bool) -> None:
    """Delete captured records and labels from the fleet database (all, or older ones, or one device's)."""
    from toolkit.capture.store import purge

    t = parse_time(before, "--before")
    what = " and ".join(x for x in (f"collected before {_t(t)}" if t else "", f"of device {device}" if device else "")
                        if x) or "all"
    if not yes:
        click.confirm(f"delete {what} captured records and labels?", abort=True)
    db = _open(s, db_path)
    try:
        n = purge(db, t, device)
    finally:
        db.close()
    click.echo(f"deleted {n['captures']} captured record(s), {n['labels']} label(s), {n['parts']} partial record(s)")


@capture.command("request")
@click.option("--device", help="The device to capture everything on.")
@click.option("--group", help="Or every device of this group.")
@click.option("--minutes", type=click.FloatRange(0, 24 * 60), required=True,
              help="How long to capture every request (0: stop an earlier request).")
@click.option("--url", default="", show_default="none: over MQTT",
              help="Devices upload captured records to this http(s) URL (`edgeship capture receive`) instead.")
@mqtt_options
@click.option("--key", type=click.Path(dir_okay=False, path_type=Path), show_default="HOME/keys/signing.pem",
              help="Signing key (devices accept capture requests signed by a key in their keyring).")
@click.pass_obj
def capture_request(s: Settings, device: str | None, group: str | None, minutes: float, url: str, conn: Any,
                    fleet_name: str, key: Path | None) -> None:
    """Ask a device (or a group) to capture every request for N minutes (signed, retained)."""
    from toolkit.capture.request import send_request
    from toolkit.signing import load_key

    if bool(device) == bool(group):
        raise click.UsageError("give --device or --group")
    if url and not url.startswith(("http://", "https://")):
        raise click.BadParameter(f"{url!r} is not an http(s) URL", param_hint="--url")
    topic = send_request(conn, fleet_name, load_key(key or s.key_path), minutes, device=device, group=group, url=url)
    click.echo(f"asked {'device ' + device if device else 'group ' + str(group)} to capture every request for "
               f"{minutes:g} minute(s) on {topic}")


@capture.command("receive")
@_db_option
@click.option("--fleet", "fleet_name", default="default", show_default=True, help="Fleet name.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address.")
@click.option("--port", default=8085, show_default=True, type=int, help="TCP port (0: any free port).")
@click.option("--seconds", type=float, show_default="until Ctrl-C", help="Stop after this many seconds.")
@click.pass_obj
def capture_receive(s: Settings, db_path: Path | None, fleet_name: str, host: str, port: int,
                    seconds: float | None) -> None:
    """Receive captured records by HTTP POST (devices upload there when a capture request gives --url). Put
    it behind TLS with client certificates: it cannot tell which device is posting by itself."""
    from toolkit.capture.receive import Receiver

    rec = Receiver(db_path or s.home / "fleet.db", fleet_name, host, port).start()
    click.echo(f"receiving captured records for fleet {fleet_name!r} on {rec.url}; Ctrl-C to stop")
    run_for(seconds, rec.stop)
    click.echo(f"stored {rec.stored} message(s), rejected {rec.rejected}")


def register(cli: click.Group) -> None:
    cli.add_command(capture)

