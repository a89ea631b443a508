"""Fleet state from the broker's retained reported/presence messages: a live watcher (one
subscription, updated as devices report) and a one-shot ``devices`` snapshot.

A snapshot is complete, not "whatever arrived within a second": the watcher waits for the broker to
acknowledge its subscription (SUBACK), then sends itself a marker message on its own sync topic and
waits for it to come back. The broker delivers a subscription's retained messages before anything
published after the subscription, so when the marker is back every retained report is in, however
slow the broker or the link.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from agent.errors import ProtocolError
from agent.fleet.mqtt import Broker, connect_blocking, make_client
from agent.fleet.protocol import PREFIX, parse_device_topic, parse_presence, parse_reported
from toolkit.errors import ToolkitError

log = logging.getLogger(__name__)
REPORTED_FIELDS = ("group", "model", "version", "status", "error", "t", "installed_sha256", "transfer", "seq")
SYNC_TIMEOUT = 60.0  # seconds a snapshot may take on a slow broker before it is an error


class FleetWatcher:
    def __init__(self, broker: Broker, fleet: str):
        self.broker, self.fleet = broker, fleet
        self._found: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._synced = threading.Condition(self._lock)
        self._marker = 0  # the last sync marker that came back
        self.subscribed = threading.Event()
        client_id = f"edgeship-fleet-{time.time_ns()}"
        self.sync_topic = f"{PREFIX}/{fleet}/host/{client_id}/sync"
        self.client = make_client(client_id, broker)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect  # (re)subscribe on every connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()

    def start(self, timeout: float = SYNC_TIMEOUT) -> "FleetWatcher":
        """Connect, and return once the broker acknowledged the subscription."""
        connect_blocking(self.client, self.broker)
        if not self.subscribed.wait(timeout):
            self.stop()
            raise ToolkitError(f"broker {self.broker.host}:{self.broker.port} did not acknowledge the "
                               f"subscription to fleet {self.fleet!r} within {timeout:g} s")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def sync(self, timeout: float = SYNC_TIMEOUT) -> None:
        """Return once every message the broker had for us before this call was delivered (a marker
        message sent to ourselves is back)."""
        marker = time.time_ns()
        self.client.publish(self.sync_topic, str(marker).encode(), qos=1)
        with self._synced:
            if not self._synced.wait_for(lambda: self._marker >= marker, timeout):
                raise ToolkitError(f"broker {self.broker.host}:{self.broker.port} did not deliver fleet "
                                   f"{self.fleet!r}'s retained state within {timeout:g} s")

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(self._found[k]) for k in sorted(self._found)]

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
        base = f"{PREFIX}/{self.fleet}/device/+"
        client.subscribe([(f"{base}/reported", 1), (f"{base}/presence", 1), (self.sync_topic, 1)])

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic == self.sync_topic:
            with self._synced:
                self._marker = max(self._marker, int(msg.payload) if msg.payload.isdigit() else 0)
                self._synced.notify_all()
            return
        where = parse_device_topic(self.fleet, msg.topic, ("reported", "presence"))
        if where is None or not msg.payload:
            return  # not ours (amqtt delivers retained messages outside the filters), or cleared
        device, kind = where
        try:
            if kind == "presence":
                update: dict[str, Any] = {"online": parse_presence(msg.payload, msg.topic).online}
            else:
                r = parse_reported(msg.payload, msg.topic, device)
                update = {k: getattr(r, k) for k in REPORTED_FIELDS}
        except ProtocolError as exc:
            log.warning("ignored: %s", exc)
            return
        with self._lock:
            self._found.setdefault(device, {"device": device, "online": False}).update(update)


def devices(broker: Broker, fleet: str, timeout: float = SYNC_TIMEOUT) -> list[dict[str, Any]]:
    """Every device's retained reported state and presence: all of them (see the module docstring), or
    ToolkitError when the broker does not deliver them within ``timeout``."""
    w = FleetWatcher(broker, fleet).start(timeout)
    try:
        w.sync(timeout)
        return w.snapshot()
    finally:
        w.stop()
