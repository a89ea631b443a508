"""`edgeship-agent` - the device CLI (no TensorFlow).

Today: verify a bundle like an update would be verified, and run a bundle's model on an input file.
The install engine, `run` service and HTTP API come with the agent issue.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
import numpy as np

from agent.errors import AgentError, InputError


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AgentError as exc:
            err = click.ClickException(str(exc))
            err.exit_code = exc.exit_code
            raise err from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeship")
def cli() -> None:
    """edgeship-agent: verify and run edgeship bundles on a device."""


def _open(bundle: Path, keyring: Path, folder: Path):
    from agent.bundle import extract_bundle
    from agent.golden import replay
    from agent.keys import Keyring
    from agent.runtime import load_model

    manifest = extract_bundle(bundle, Keyring.load(keyring), folder)
    model = load_model(folder / manifest.model_file, threads=manifest.threads)
    return manifest, model, replay(model, manifest, folder)


@cli.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--keyring", required=True, type=click.Path(exists=True, path_type=Path),
              help="Trusted .pub file or folder of them.")
def verify(bundle: Path, keyring: Path) -> None:
    """Check signature and hashes, load the model and replay its golden set."""
    with tempfile.TemporaryDirectory(prefix="edgeship-agent-") as tmp:
        m, model, worst = _open(bundle, keyring, Path(tmp) / "b")
    click.echo(f"OK {m.id} {m.format}/{m.precision} in {model.runtime}; golden max |error| {worst:.3g}")


@cli.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--keyring", required=True, type=click.Path(exists=True, path_type=Path),
              help="Trusted .pub file or folder of them.")
@click.option("--input", "input_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=".npy array, .npz keyed by input name, or .json (list or {name: list}).")
def predict(bundle: Path, keyring: Path, input_path: Path) -> None:
    """Run BUNDLE's model on an input file; prints JSON outputs (and top-1 label when labelled)."""
    if input_path.suffix == ".npy":
        feed: Any = np.load(input_path, allow_pickle=False)
    elif input_path.suffix == ".npz":
        with np.load(input_path, allow_pickle=False) as npz:
            feed = {k: npz[k] for k in npz.files}
    else:
        try:
            feed = json.loads(input_path.read_text())
        except ValueError as exc:
            raise InputError(f"{input_path}: not valid JSON ({exc})") from exc
    with tempfile.TemporaryDirectory(prefix="edgeship-agent-") as tmp:
        m, model, _ = _open(bundle, keyring, Path(tmp) / "b")
        out = model.predict(feed)
    result: dict[str, Any] = {"model": m.id, "outputs": {k: v.tolist() for k, v in out.items()}}
    first = next(iter(out.values()))
    if m.labels and first.ndim == 2 and first.shape[1] == len(m.labels):
        result["labels"] = [m.labels[i] for i in first.argmax(1)]
    click.echo(json.dumps(result))


class _JSONFormatter:
    def format(self, record: Any) -> str:
        return json.dumps({"t": round(record.created, 3), "level": record.levelname, "logger": record.name,
                           "msg": record.getMessage()})


def _agent(state_dir: Path, keyring: Path, arch: str | None, threads: int | None):
    import platform

    from agent.keys import Keyring
    from agent.serve.service import Agent

    return Agent(state_dir, Keyring.load(keyring), arch or platform.machine(), threads, faults=_faults())


def _faults() -> dict[str, str]:
    """Test hook: EDGESHIP_AGENT_FAULTS="Commit=crash,VerifyModel=error" (read here, at the entry point)."""
    import os

    return dict(f.split("=", 1) for f in os.environ.get("EDGESHIP_AGENT_FAULTS", "").split(",") if "=" in f)


_state_opts = [
    click.option("--state-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
                 help="Agent state folder (slots and state.json)."),
    click.option("--keyring", required=True, type=click.Path(exists=True, path_type=Path),
                 help="Trusted .pub file or folder of them."),
    click.option("--arch", show_default="this machine's", help="Device architecture."),
    click.option("--threads", type=int, show_default="the manifest's", help="Inference threads."),
]


def state_options(fn: Any) -> Any:
    for opt in reversed(_state_opts):
        fn = opt(fn)
    return fn


@cli.command()
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@state_options
@click.option("--allow-downgrade", is_flag=True, help="Accept a lower version (explicit rollback).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def install(bundle: Path, state_dir: Path, keyring: Path, arch: str | None, threads: int | None,
            allow_downgrade: bool, as_json: bool) -> None:
    """Verify and install BUNDLE crash-safely; the previous version is kept for rollback."""
    agent = _agent(state_dir, keyring, arch, threads)
    agent.start()
    res = agent.install(bundle, allow_downgrade)
    if as_json:
        click.echo(json.dumps(res.__dict__))
    else:
        click.echo(f"{res.status}: {' -> '.join(res.chain)}" + (f"\n{res.reason}" if res.reason else ""))
    if not res.ok:
        sys.exit(1)


@cli.command()
@state_options
def rollback(state_dir: Path, keyring: Path, arch: str | None, threads: int | None) -> None:
    """Switch back to the previous installed version."""
    agent = _agent(state_dir, keyring, arch, threads)
    agent.start()
    click.echo(f"active: {agent.rollback()}")


@cli.command()
@state_options
def status(state_dir: Path, keyring: Path, arch: str | None, threads: int | None) -> None:
    """Recover if needed and print the active model, fleet state and telemetry queue as JSON."""
    agent = _agent(state_dir, keyring, arch, threads)
    agent.start()
    doc = agent.status()
    from agent.fleet.desired import state_summary
    from agent.fleet.reporter import OUTBOX_FILE

    if (fleet := state_summary(Path(state_dir))) is not None:
        doc["fleet"] = fleet
    queue_file = Path(state_dir) / OUTBOX_FILE
    if queue_file.exists():
        from agent.fleet.outbox import Outbox

        box = Outbox(queue_file)
        doc["telemetry_queue"] = {"records": len(box), "dropped": box.dropped}
        box.close()
    click.echo(json.dumps(doc, default=str))


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="agent.toml (see docs/agent.md).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), show_default="[agent] state_dir",
              help="Agent state folder (overrides the config file).")
@click.option("--keyring", type=click.Path(path_type=Path), show_default="[agent] keyring",
              help="Trusted .pub file or folder of them (overrides the config file).")
@click.option("--host", "http_host", show_default="127.0.0.1", help="HTTP bind address.")
@click.option("--port", "http_port", type=int, show_default="8080", help="HTTP port (0: any free port).")
@click.option("--install", "install_bundle", type=click.Path(dir_okay=False, path_type=Path),
              help="Install this bundle at start-up (the running server hot-swaps to it).")
@click.option("--log-json", is_flag=True, help="One JSON object per log line (for journald/log shippers).")
def run(config_path: Path | None, state_dir: Path | None, keyring: Path | None, http_host: str | None,
        http_port: int | None, install_bundle: Path | None, log_json: bool) -> None:
    """Run the agent service: recover, load the active model, serve the local HTTP API."""
    import logging
    import signal
    import threading

    from agent.config import load_config
    from agent.serve.http import make_server
    from agent.keys import Keyring
    from agent.serve.service import Agent

    handler = logging.StreamHandler(sys.stdout)  # stdout -> journald under systemd
    handler.setFormatter(_JSONFormatter() if log_json else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    cfg = load_config(config_path, {"state_dir": state_dir, "keyring": keyring, "http_host": http_host,
                                    "http_port": http_port})
    agent = Agent(cfg.state_dir, Keyring.load(cfg.keyring), cfg.arch, cfg.threads, faults=_faults())
    agent.start()
    server = make_server(agent, cfg.http_host, cfg.http_port, cfg.max_body_bytes)
    host, port = server.server_address[:2]
    cur = agent.current
    click.echo(f"edgeship-agent {cfg.device_id}: serving "
               f"{cur.manifest.id if cur else 'no model yet'} on http://{host}:{port}", err=False)
    sys.stdout.flush()
    def _term(*_: Any) -> None:
        raise KeyboardInterrupt  # systemd stop: leave serve_forever and close cleanly

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _term)
    link = None
    if cfg.mqtt_broker:
        from agent.fleet.link import FleetLink
        from agent.fleet.mqtt import Broker

        broker = Broker.parse(cfg.mqtt_broker, cfg.mqtt_username, cfg.mqtt_password, cfg.mqtt_ca_file)
        from agent.fleet.reporter import TelemetryConfig

        tele = TelemetryConfig(cfg.telemetry_interval, cfg.heartbeat, cfg.telemetry_queue_max, cfg.drift_psi,
                               cfg.drift_every)
        link = FleetLink(agent, Keyring.load(cfg.keyring), broker, cfg.fleet, cfg.device_id, cfg.group, tele)
        link.start()
        click.echo(f"fleet {cfg.fleet!r} via {broker.host}:{broker.port} (group {cfg.group or '-'})")
    if install_bundle:
        threading.Thread(target=lambda: click.echo(f"install: {agent.install(install_bundle).status}"),
                         daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if link is not None:
            link.stop()
        server.server_close()


def main() -> None:
    cli(prog_name="edgeship-agent")


if __name__ == "__main__":
    sys.exit(main())
