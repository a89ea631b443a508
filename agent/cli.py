"""`edgeship-agent` - the device CLI (no TensorFlow).

`run` is the service: it owns its state dir (agent.owner) and answers `install`, `rollback` and `status`
on its control channel (agent.control). Without a running agent those commands work on the state dir
themselves, holding its lock; `status` never recovers or writes anything.
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


def _open(bundle: Path, keyring: Path, folder: Path, root_key: Path | None, model_key: Path | None):
    from agent.bundle import extract_bundle
    from agent.golden import replay
    from agent.runtime import load_model
    from agent.seal import load_opener
    from agent.trust import load_trust

    manifest = extract_bundle(bundle, load_trust(keyring, root_key), folder, opener=load_opener(model_key))
    model = load_model(folder / manifest.model_file, threads=manifest.threads)
    return manifest, model, replay(model, manifest, folder)


_KEYRING_HELP = "Trusted .pub file or folder of them; with --root-key, the root-signed keyring.json."
_trust_opts = [
    click.option("--root-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 envvar="EDGESHIP_AGENT_ROOT_KEY", show_envvar=True,
                 help="The fleet's root public key: the keyring is a document it signed (docs/security.md)."),
    click.option("--model-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 envvar="EDGESHIP_AGENT_MODEL_KEY", show_envvar=True,
                 help="This device's model key (from `edgeship device enroll`): opens encrypted bundles."),
]


def trust_options(fn: Any) -> Any:
    for opt in reversed(_trust_opts):
        fn = opt(fn)
    return fn


@cli.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--keyring", required=True, type=click.Path(exists=True, path_type=Path), help=_KEYRING_HELP)
@trust_options
def verify(bundle: Path, keyring: Path, root_key: Path | None, model_key: Path | None) -> None:
    """Check signature and hashes, load the model and replay its golden set."""
    with tempfile.TemporaryDirectory(prefix="edgeship-agent-") as tmp:
        m, model, worst = _open(bundle, keyring, Path(tmp) / "b", root_key, model_key)
    click.echo(f"OK {m.id} {m.format}/{m.precision} in {model.runtime}; golden max |error| {worst:.3g}")


@cli.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--keyring", required=True, type=click.Path(exists=True, path_type=Path), help=_KEYRING_HELP)
@trust_options
@click.option("--input", "input_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=".npy array, .npz keyed by input name, or .json (list or {name: list}).")
def predict(bundle: Path, keyring: Path, root_key: Path | None, model_key: Path | None, input_path: Path) -> None:
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
        m, model, _ = _open(bundle, keyring, Path(tmp) / "b", root_key, model_key)
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


# Fault injection for tests only: the tests fill this in a process they start themselves (tests/faults.py);
# nothing in a production process reads it from the environment or a flag.
FAULTS: dict[str, str] = {}
LOCK_WAIT = 30.0  # seconds `run` waits for a short-lived owner (a CLI install) of its state dir


def _agent(state_dir: Path, keyring: Path, arch: str | None, threads: int | None, profile: str | None = None,
           root_key: Path | None = None, model_key: Path | None = None):
    import platform

    from agent.seal import load_opener
    from agent.serve.service import Agent
    from agent.trust import load_trust

    return Agent(state_dir, load_trust(keyring, root_key, state_dir), arch or platform.machine(), threads,
                 faults=dict(FAULTS), profile=profile, opener=load_opener(model_key))


def _on_owner(state_dir: Path, request: dict[str, Any], local: Any, timeout: float | None) -> dict[str, Any]:
    """Send ``request`` to the agent running on ``state_dir``; without one, run ``local()`` holding the
    state dir's lock (so no agent starts meanwhile)."""
    from agent import control
    from agent.owner import StateLock

    for _ in range(2):  # an agent may start between the two checks: ask it then
        answer = control.call(state_dir, request, timeout)
        if answer is not None:
            return answer
        lock = StateLock(state_dir)
        if lock.try_acquire(f"edgeship-agent {request['op']}"):
            with lock:
                return local()
    lock = StateLock(state_dir)
    from agent.errors import BusyError

    raise BusyError(f"{state_dir} is in use by {lock.describe_holder()}; try again when it has finished")


_state_opts = [
    click.option("--state-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
                 help="Agent state folder (slots and state.json)."),
    click.option("--keyring", required=True, type=click.Path(exists=True, path_type=Path), help=_KEYRING_HELP),
    *_trust_opts,
    click.option("--arch", envvar="EDGESHIP_AGENT_ARCH", show_envvar=True, show_default="this machine's",
                 help="Device architecture."),
    click.option("--threads", type=int, show_default="the manifest's", help="Inference threads."),
    click.option("--profile", envvar="EDGESHIP_AGENT_PROFILE", show_envvar=True,
                 help="Refuse bundles built for another device profile."),
]


def state_options(fn: Any) -> Any:
    for opt in reversed(_state_opts):
        fn = opt(fn)
    return fn


@cli.command()
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@state_options
@click.option("--allow-downgrade", is_flag=True, help="Accept a lower version (explicit rollback).")
@click.option("--allow-model-change", is_flag=True,
              help="Accept a bundle of another model name than the one served (replaces it).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def install(bundle: Path, state_dir: Path, keyring: Path, root_key: Path | None, model_key: Path | None,
            arch: str | None, threads: int | None, profile: str | None, allow_downgrade: bool,
            allow_model_change: bool, as_json: bool) -> None:
    """Verify and install BUNDLE crash-safely; the previous version is kept for rollback.
    Beside a running agent, the running agent installs it (BUNDLE must be readable by its user)."""
    def local() -> dict[str, Any]:
        agent = _agent(state_dir, keyring, arch, threads, profile, root_key, model_key)
        agent.start()
        return agent.install(bundle, allow_downgrade, allow_model_change).__dict__

    res = _on_owner(state_dir, {"op": "install", "bundle": str(bundle.resolve()), "allow_downgrade": allow_downgrade,
                                "allow_model_change": allow_model_change}, local, None)
    if as_json:
        click.echo(json.dumps(res))
    else:
        click.echo(f"{res['status']}: {' -> '.join(res['chain'])}" + (f"\n{res['reason']}" if res["reason"] else ""))
    if res["status"] not in ("installed", "nothing-to-do", "recovered"):
        sys.exit(1)


@cli.command()
@state_options
def rollback(state_dir: Path, keyring: Path, root_key: Path | None, model_key: Path | None, arch: str | None,
             threads: int | None, profile: str | None) -> None:
    """Switch back to the previous installed version (the running agent switches, when there is one)."""
    def local() -> dict[str, Any]:
        agent = _agent(state_dir, keyring, arch, threads, profile, root_key, model_key)
        agent.start()
        return {"active": agent.rollback()}

    click.echo(f"active: {_on_owner(state_dir, {'op': 'rollback'}, local, None)['active']}")


@cli.command()
@state_options
def status(state_dir: Path, keyring: Path, root_key: Path | None, model_key: Path | None, arch: str | None,
           threads: int | None, profile: str | None) -> None:
    """Print what is served, the update and fleet state and the telemetry queue as JSON. Read-only: asks
    the running agent, or reads the state dir without recovering or writing anything."""
    from agent import control, status as st

    doc = control.call(state_dir, {"op": "status"})
    if doc is None:
        doc = st.report(state_dir)
        if root_key is not None:  # the keyring a start would trust (read only, like the rest)
            from agent.trust import load_trust

            try:
                doc["keyring"] = load_trust(keyring, root_key, state_dir).status()
            except AgentError as exc:
                doc["keyring"] = {"error": str(exc)}
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

    from agent import control
    from agent.config import load_config
    from agent.owner import StateLock
    from agent.seal import load_opener
    from agent.serve.http import make_server, settings_of
    from agent.serve.service import Agent
    from agent.trust import load_trust

    handler = logging.StreamHandler(sys.stdout)  # stdout -> journald under systemd
    handler.setFormatter(_JSONFormatter() if log_json else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    cfg = load_config(config_path, {"state_dir": state_dir, "keyring": keyring, "http_host": http_host,
                                    "http_port": http_port})
    broker = None
    if cfg.mqtt_broker:  # a bad broker URL is refused before anything starts
        from agent.fleet.mqtt import Broker

        broker = Broker.parse(cfg.mqtt_broker, cfg.mqtt_username, cfg.mqtt_password, cfg.mqtt_ca_file,
                              cfg.mqtt_cert_file, cfg.mqtt_key_file)
    lock = StateLock(cfg.state_dir).acquire(  # one owner; a running agent answers on its channel: no wait
        "edgeship-agent run", LOCK_WAIT, give_up=lambda: control.call(cfg.state_dir, {"op": "status"}, 5) is not None)
    channel = server = link = agent = None
    try:
        trust = load_trust(cfg.keyring, cfg.root_key, cfg.state_dir)  # one instance: the link updates it
        agent = Agent(cfg.state_dir, trust, cfg.arch, cfg.threads, faults=dict(FAULTS),
                      profile=cfg.profile, interpreters=cfg.interpreters, max_sequences=cfg.max_sequences,
                      sequence_idle_timeout=cfg.sequence_idle_timeout, opener=load_opener(cfg.model_key))
        agent.start()
        if cfg.capture.enabled:
            from agent.capture.recorder import Capture

            agent.capture = Capture(cfg.capture, cfg.state_dir).start()
            click.echo(f"prediction capture on: {cfg.capture}")
        channel = control.ControlServer(agent).start()
        try:
            server = make_server(agent, cfg.http_host, cfg.http_port, settings=settings_of(cfg), token=cfg.http_token,
                                 tls=(cfg.http_tls_cert, cfg.http_tls_key) if cfg.http_tls_cert else None)
        except OSError as exc:
            raise AgentError(f"cannot serve HTTP on {cfg.http_host}:{cfg.http_port} ({exc})") from exc
        host, port = server.server_address[:2]
        cur = agent.current
        click.echo(f"edgeship-agent {cfg.device_id}: serving {cur.manifest.id if cur else 'no model yet'} on "
                   f"{'https' if cfg.http_tls_cert else 'http'}://{host}:{port}", err=False)
        sys.stdout.flush()

        def _term(*_: Any) -> None:
            raise KeyboardInterrupt  # systemd stop: leave serve_forever and close cleanly

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _term)
        if broker is not None:
            from agent.fleet.link import FleetLink
            from agent.fleet.reporter import TelemetryConfig

            tele = TelemetryConfig(cfg.telemetry_interval, cfg.heartbeat, cfg.telemetry_queue_max, cfg.drift_psi,
                                   cfg.drift_every)
            link = FleetLink(agent, trust, broker, cfg.fleet, cfg.device_id, cfg.group, tele)
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
        if server is not None:
            server.server_close()
        if channel is not None:
            channel.stop()
        if agent is not None and agent.capture is not None:
            agent.capture.stop()
        lock.release()


@cli.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="agent.toml to take the state dir, keyring and arch from.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              show_default="from the config, /var/lib/edgeship", help="Agent state folder whose free disk counts.")
@click.option("--keyring", type=click.Path(exists=True, path_type=Path),
              show_default="from the config", help="Trusted .pub file or folder, to verify --bundle's signature.")
@click.option("--arch", show_default="EDGESHIP_AGENT_ARCH, the config's [agent] arch, else this machine's",
              help="Device architecture.")
@click.option("--bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Say whether this bundle would install here, check by check.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def doctor(config_path: Path | None, state_dir: Path | None, keyring: Path | None, arch: str | None,
           bundle: Path | None, as_json: bool) -> None:
    """What this device has (arch, Python, NumPy, runtimes, zstandard, free disk, time sync) and whether
    a bundle would install. Exits 1 when --bundle would not install. Writes nothing."""
    from agent.config import load_config
    from agent.doctor import report, text

    cfg = load_config(config_path, {"state_dir": state_dir, "keyring": keyring, "arch": arch})
    doc = report(cfg.state_dir, cfg.arch, bundle, cfg.keyring, cfg.profile, cfg.root_key, cfg.model_key)
    click.echo(json.dumps(doc) if as_json else text(doc))
    if bundle is not None and doc["bundle"]["would_install"] is False:
        sys.exit(1)


def main() -> None:
    cli(prog_name="edgeship-agent")


if __name__ == "__main__":
    sys.exit(main())
