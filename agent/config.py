"""Agent configuration: parsed once at the entry point into a frozen dataclass.

Precedence: command-line flag > environment (EDGESHIP_AGENT_*) > file (agent.toml) > default.
Errors name the file and key. A relative path in the file is relative to the file's folder (a device folder
from `edgeship device enroll` works wherever it is copied).
"""

from __future__ import annotations

import os
import platform
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from agent.capture.policy import CaptureConfig
from agent.errors import ConfigError


@dataclass(frozen=True)
class Config:
    state_dir: Path
    keyring: Path
    device_id: str
    arch: str
    threads: int | None
    http_host: str
    http_port: int
    max_body_bytes: int
    mqtt_broker: str | None = None
    fleet: str = "default"
    group: str = ""
    mqtt_username: str | None = None
    mqtt_password: str | None = field(default=None, repr=False)  # never printed
    mqtt_ca_file: str | None = None
    telemetry_interval: float = 10.0
    heartbeat: float = 30.0
    telemetry_queue_max: int = 10_000
    drift_psi: float = 0.25
    drift_every: int = 1
    max_header_bytes: int = 16 << 10
    max_connections: int = 128
    backlog: int = 1024
    read_timeout: float = 10.0
    keepalive_timeout: float = 5.0
    interpreters: int | None = None
    max_sequences: int = 16
    sequence_idle_timeout: float = 60.0
    profile: str | None = None
    capture: CaptureConfig = CaptureConfig()
    root_key: Path | None = None  # the fleet root's public key: the keyring is a document it signs
    model_key: Path | None = None  # this device's X25519 key: opens bundles sealed for it
    mqtt_cert_file: str | None = None  # client certificate and key (mutual TLS)
    mqtt_key_file: str | None = None
    http_token: str | None = field(default=None, repr=False)  # bearer token the HTTP API requires; never printed
    http_tls_cert: str | None = None  # serve HTTPS with this certificate and key
    http_tls_key: str | None = None


FIELDS: dict[str, tuple[str, type, Any]] = {
    # name: (toml key, type, default)
    "state_dir": ("agent.state_dir", str, "/var/lib/edgeship"),
    "keyring": ("agent.keyring", str, "/etc/edgeship/keys"),
    "device_id": ("agent.device_id", str, None),
    "arch": ("agent.arch", str, None),
    "threads": ("agent.threads", int, None),
    "profile": ("agent.profile", str, None),
    "http_host": ("http.host", str, "127.0.0.1"),
    "http_port": ("http.port", int, 8080),
    "max_body_bytes": ("http.max_body_bytes", int, 16 << 20),
    "mqtt_broker": ("mqtt.broker", str, None),
    "fleet": ("mqtt.fleet", str, "default"),
    "group": ("mqtt.group", str, ""),
    "mqtt_username": ("mqtt.username", str, None),
    "mqtt_password": ("mqtt.password", str, None),
    "mqtt_password_file": ("mqtt.password_file", str, None),
    "mqtt_ca_file": ("mqtt.ca_file", str, None),
    "heartbeat": ("mqtt.heartbeat", float, 30.0),
    "telemetry_interval": ("telemetry.interval", float, 10.0),
    "telemetry_queue_max": ("telemetry.queue_max", int, 10_000),
    "drift_psi": ("telemetry.drift_psi", float, 0.25),
    "drift_every": ("telemetry.drift_every", int, 1),
    "max_header_bytes": ("http.max_header_bytes", int, 16 << 10),
    "max_connections": ("http.max_connections", int, 128),
    "backlog": ("http.backlog", int, 1024),
    "read_timeout": ("http.read_timeout", float, 10.0),
    "keepalive_timeout": ("http.keepalive_timeout", float, 5.0),
    "interpreters": ("agent.interpreters", int, None),
    "max_sequences": ("agent.max_sequences", int, 16),
    "sequence_idle_timeout": ("agent.sequence_idle_timeout", float, 60.0),
    # [capture] (docs/agent.md, Prediction capture): name -> CaptureConfig field without the prefix
    "capture_enabled": ("capture.enabled", bool, False),
    "capture_rate": ("capture.rate", float, 0.0),
    "capture_low_confidence": ("capture.low_confidence", float, 0.0),
    "capture_margin": ("capture.margin", float, 0.0),
    "capture_drift_psi": ("capture.drift_psi", float, 0.0),
    "capture_budget_bytes": ("capture.budget_bytes", int, 10 << 20),
    "capture_queue_max": ("capture.queue_max", int, 1000),
    "capture_queue_bytes": ("capture.queue_bytes", int, 64 << 20),
    "capture_labels_max": ("capture.labels_max", int, 10_000),
    "capture_recent": ("capture.recent", int, 10_000),
    "root_key": ("agent.root_key", str, None),
    "model_key": ("agent.model_key", str, None),
    "mqtt_cert_file": ("mqtt.cert_file", str, None),
    "mqtt_key_file": ("mqtt.key_file", str, None),
    "http_token": ("http.token", str, None),
    "http_token_file": ("http.token_file", str, None),
    "http_tls_cert": ("http.tls_cert", str, None),
    "http_tls_key": ("http.tls_key", str, None),
}
PATHS = ("state_dir", "keyring", "root_key", "model_key", "mqtt_password_file", "mqtt_ca_file", "mqtt_cert_file",
         "mqtt_key_file", "http_token_file", "http_tls_cert", "http_tls_key")  # relative: to the file's folder
SECRETS = {"mqtt_password": "mqtt_password_file", "http_token": "http_token_file"}
FRACTIONS = ("capture_rate", "capture_low_confidence", "capture_margin")  # in [0, 1]
SERVING = ("max_header_bytes", "max_connections", "backlog", "read_timeout", "keepalive_timeout", "interpreters",
           "max_sequences", "sequence_idle_timeout")


def load_config(path: Path | None, flags: Mapping[str, Any] | None = None,
                env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    doc: dict[str, Any] = {}
    where = str(path) if path else "defaults"
    if path is not None:
        try:
            doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: config file not found") from exc
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    values: dict[str, Any] = {}
    for name, (key, typ, default) in FIELDS.items():
        section, k = key.split(".")
        v = (flags or {}).get(name)
        src = "flag"
        if isinstance(v, Path):
            v = str(v)
        if v is None and f"EDGESHIP_AGENT_{name.upper()}" in env:
            v, src = env[f"EDGESHIP_AGENT_{name.upper()}"], "env"
        if v is None and k in doc.get(section, {}):
            v, src = doc[section][k], "file"
            if name in PATHS and isinstance(v, str) and path is not None:
                v = str(Path(path).parent / Path(v).expanduser())  # an absolute v stays as it is
        if v is None:
            v = default
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if typ is bool and src == "env" and isinstance(v, str):
            flag = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
                    "off": False}.get(v.strip().lower())
            if flag is None:
                raise ConfigError(f"EDGESHIP_AGENT_{name.upper()}: expected true or false, got {v!r}")
            v = flag
        if v is not None and (not isinstance(v, typ) or (isinstance(v, bool) and typ is not bool)):
            try:
                v = typ(v) if src == "env" and typ is not bool else _bad(where, key, typ, v)
            except ValueError as exc:
                raise ConfigError(f"EDGESHIP_AGENT_{name.upper()}: expected {typ.__name__}, got {v!r}") from exc
        values[name] = v
    for name in ("threads", "http_port", "max_body_bytes", "heartbeat", "telemetry_interval", "telemetry_queue_max",
                 "drift_psi", "drift_every", *SERVING):
        low = 0 if name in ("http_port", "telemetry_interval", "drift_every") else 1e-9
        if values[name] is not None and values[name] < low:
            raise ConfigError(f"{where}: {FIELDS[name][0]}: must be positive, got {values[name]}")
    for name in ("capture_drift_psi", "capture_budget_bytes", *FRACTIONS):
        if values[name] < 0 or (name in FRACTIONS and values[name] > 1):
            raise ConfigError(f"{where}: {FIELDS[name][0]}: must be {'in [0, 1]' if name in FRACTIONS else '>= 0'}, "
                              f"got {values[name]}")
    for name in ("capture_queue_max", "capture_queue_bytes", "capture_labels_max", "capture_recent"):
        if values[name] < 1:
            raise ConfigError(f"{where}: {FIELDS[name][0]}: must be positive, got {values[name]}")
    for secret, file_key in SECRETS.items():
        if values[file_key]:
            if values[secret]:
                raise ConfigError(f"{where}: {FIELDS[secret][0]} and {FIELDS[file_key][0]} are both set; keep one")
            values[secret] = read_secret(Path(values[file_key]), FIELDS[file_key][0])
    if bool(values["http_tls_cert"]) != bool(values["http_tls_key"]):
        raise ConfigError(f"{where}: http.tls_cert and http.tls_key go together")
    return Config(state_dir=Path(values["state_dir"]), keyring=Path(values["keyring"]),
                  device_id=values["device_id"] or socket.gethostname(),
                  arch=values["arch"] or platform.machine(), threads=values["threads"],
                  http_host=values["http_host"], http_port=values["http_port"],
                  max_body_bytes=values["max_body_bytes"], mqtt_broker=values["mqtt_broker"],
                  fleet=values["fleet"], group=values["group"], mqtt_username=values["mqtt_username"],
                  mqtt_password=values["mqtt_password"], mqtt_ca_file=values["mqtt_ca_file"], profile=values["profile"],
                  capture=CaptureConfig(**{k[8:]: v for k, v in values.items() if k.startswith("capture_")}),
                  root_key=Path(values["root_key"]) if values["root_key"] else None,
                  model_key=Path(values["model_key"]) if values["model_key"] else None,
                  **{k: values[k] for k in ("telemetry_interval", "heartbeat", "telemetry_queue_max", "drift_psi",
                                            "drift_every", "mqtt_cert_file", "mqtt_key_file", "http_token",
                                            "http_tls_cert", "http_tls_key", *SERVING)})


def read_secret(path: Path, key: str) -> str:
    """A password from a file (first line, without its newline); the error never shows the content."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}: cannot read {path} ({type(exc).__name__})") from exc
    secret = text.split("\n", 1)[0].rstrip("\r")
    if not secret:
        raise ConfigError(f"{key}: {path} is empty")
    return secret


def _bad(where: str, key: str, typ: type, v: Any) -> Any:
    shown = type(v).__name__ if "password" in key or "token" in key else repr(v)  # never echo a credential
    raise ConfigError(f"{where}: {key}: expected {typ.__name__}, got {shown}")
