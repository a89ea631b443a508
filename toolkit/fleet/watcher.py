"""Fleet state from the broker's retained reported/presence messages: a live watcher (one
subscription, updated as devices report) and a one-shot ``devices`` snapshot."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from agent.fleet.mqtt import Broker, connect_blocking, make_client
from agent.fleet.protocol import PREFIX

REPORTED_FIELDS = ("group", "model", "version", "status", "error", "t", "installed_sha256", "transfer", "seq")


class FleetWatcher:
    def __init__(self, broker: Broker, fleet: str):
        self.broker, self.fleet = broker, fleet
        self._found: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.client = make_client(f"edgeship-fleet-{time.time_ns()}", broker)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect  # (re)subscribe on every connect

    def start(self) -> "FleetWatcher":
        connect_blocking(self.client, self.broker)
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(self._found[k]) for k in sorted(self._found)]

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
        base = f"{PREFIX}/{self.fleet}/device/+"
        client.subscribe([(f"{base}/reported", 1), (f"{base}/presence", 1)])

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        parts = msg.topic.split("/")
        if len(parts) != 6 or parts[3] != "device" or not msg.payload:
            return
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        with self._lock:
            d = self._found.setdefault(parts[4], {"device": parts[4], "online": False})
            if parts[5] == "presence":
                d["online"] = bool(doc.get("online"))
            elif parts[5] == "reported":
                d.update({k: doc.get(k) for k in REPORTED_FIELDS})


def devices(broker: Broker, fleet: str, wait: float = 1.5) -> list[dict[str, Any]]:
    """Every device's retained reported state and presence (``wait`` seconds of collection)."""
    w = FleetWatcher(broker, fleet).start()
    try:
        time.sleep(wait)
        return w.snapshot()
    finally:
        w.stop()
