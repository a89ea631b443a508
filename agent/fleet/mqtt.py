"""MQTT connection helpers shared by the agent and the host (paho-mqtt 2.x, VERSION2 callbacks)."""

from __future__ import annotations

import re
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from agent.errors import AgentError


@dataclass(frozen=True)
class Broker:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never printed
    ca_file: str | None = None
    cert_file: str | None = None  # client certificate (mutual TLS: the broker takes its name as the identity)
    key_file: str | None = None

    @classmethod
    def parse(cls, url: str, username: str | None = None, password: str | None = None,
              ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None) -> "Broker":
        """Errors show the URL with any password in it masked."""
        try:
            u = urlparse(url if "://" in url else f"mqtt://{url}")
            port = u.port
        except ValueError:  # e.g. a port that is not a number
            raise AgentError(f"broker {redact(url)!r}: malformed URL; expected mqtt[s]://host:port") from None
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise AgentError(f"broker {redact(url)!r}: expected mqtt://host:port or mqtts://host:port")
        tls = u.scheme == "mqtts"
        if bool(cert_file) != bool(key_file):
            raise AgentError("a client certificate needs both its certificate file and its key file")
        if cert_file and not tls:
            raise AgentError(f"broker {redact(url)!r}: a client certificate needs mqtts://")
        return cls(u.hostname, port or (8883 if tls else 1883), tls, username or u.username,
                   password or u.password, ca_file, cert_file, key_file)


def redact(url: str) -> str:
    """``url`` with the password of its user-info part replaced by ***."""
    return re.sub(r"^([^:/]*://)?([^@/:]*):[^/]*@", lambda m: f"{m.group(1) or ''}{m.group(2)}:***@", url)


def make_client(client_id: str, broker: Broker, clean_session: bool = True):
    """``clean_session=False``: the broker keeps the subscriptions and queues QoS 1 messages while we are away."""
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                    clean_session=clean_session)
    if broker.username:
        c.username_pw_set(broker.username, broker.password)
    if broker.tls:
        try:
            c.tls_set(ca_certs=broker.ca_file, certfile=broker.cert_file, keyfile=broker.key_file,
                      cert_reqs=ssl.CERT_REQUIRED)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: unreadable or mismatched files
            raise AgentError(f"TLS set-up for {broker.host}:{broker.port} failed: {exc} (check ca_file, "
                             f"cert_file and key_file)") from exc
    c.reconnect_delay_set(min_delay=1, max_delay=30)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    return c


def connect_blocking(client: Any, broker: Broker, timeout: float = 15.0) -> None:
    """Connect, start the network loop and wait for the broker's answer (for host tools: a wrong port,
    TLS mismatch or bad credentials is an error, not an empty result). The agent connects asynchronously."""
    answered, result = threading.Event(), {}
    chained, chained_dis = client.on_connect, client.on_disconnect

    def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
        result["reason"] = reason
        answered.set()
        if chained is not None:
            chained(c, userdata, flags, reason, props)

    def on_disconnect(c: Any, userdata: Any, *args: Any) -> None:
        if not answered.is_set():  # closed before the CONNACK (with TLS 1.3 the server checks a client
            result["closed"] = True  # certificate after the handshake, then hangs up)
            answered.set()
        if chained_dis is not None:
            chained_dis(c, userdata, *args)

    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    where = f"broker {broker.host}:{broker.port}"
    try:
        client.connect(broker.host, broker.port, keepalive=30)
    except OSError as exc:  # includes ssl.SSLError
        raise AgentError(f"cannot reach {where} ({exc})") from exc
    client.loop_start()
    if not answered.wait(timeout):
        client.loop_stop()
        raise AgentError(f"{where} did not answer the MQTT connect within {timeout:g} s "
                         f"(wrong port, or {'plain MQTT to a TLS' if not broker.tls else 'TLS to a plain'} listener?)")
    if result.get("closed"):
        client.loop_stop()
        raise AgentError(f"cannot reach {where}: it closed the connection before answering (a client certificate "
                         f"it does not accept: missing, revoked or from another CA?)")
    client.on_disconnect = chained_dis
    if getattr(result["reason"], "is_failure", False):
        client.disconnect()
        client.loop_stop()
        raise AgentError(f"{where} refused the connection: {result['reason']} (check the "
                         f"{'certificate' if broker.cert_file else 'username/password'})")
