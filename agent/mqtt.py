"""MQTT connection helpers shared by the agent and the host (paho-mqtt 2.x, VERSION2 callbacks)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import urlparse

from agent.errors import AgentError


@dataclass(frozen=True)
class Broker:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None

    @classmethod
    def parse(cls, url: str, username: str | None = None, password: str | None = None,
              ca_file: str | None = None) -> "Broker":
        u = urlparse(url if "://" in url else f"mqtt://{url}")
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise AgentError(f"broker {url!r}: expected mqtt://host:port or mqtts://host:port")
        tls = u.scheme == "mqtts"
        return cls(u.hostname, u.port or (8883 if tls else 1883), tls, username or u.username,
                   password or u.password, ca_file)


def make_client(client_id: str, broker: Broker, clean_session: bool = True):
    """``clean_session=False``: the broker keeps the subscriptions and queues QoS 1 messages while we are away."""
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                    clean_session=clean_session)
    if broker.username:
        c.username_pw_set(broker.username, broker.password)
    if broker.tls:
        c.tls_set(ca_certs=broker.ca_file, cert_reqs=ssl.CERT_REQUIRED)
    c.reconnect_delay_set(min_delay=1, max_delay=30)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    return c
