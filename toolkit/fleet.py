"""Fleet status from the broker's retained reported/presence messages."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from agent.mqtt import Broker, connect_blocking, make_client
from agent.protocol import PREFIX


def devices(broker: Broker, fleet: str, wait: float = 1.5) -> list[dict[str, Any]]:
    """Read every device's retained reported state and presence (``wait`` seconds of collection)."""
    found: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def on_message(c: Any, u: Any, msg: Any) -> None:
        parts = msg.topic.split("/")
        if len(parts) != 6 or not msg.payload:
            return
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        with lock:
            d = found.setdefault(parts[4], {"device": parts[4], "online": False})
            if parts[5] == "presence":
                d["online"] = bool(doc.get("online"))
            elif parts[5] == "reported":
                d.update({k: doc.get(k) for k in ("group", "model", "version", "status", "error", "t",
                                                  "installed_sha256", "transfer", "seq")})

    client = make_client(f"edgeship-fleet-{time.time_ns()}", broker)
    client.on_message = on_message
    connect_blocking(client, broker)
    client.subscribe([(f"{PREFIX}/{fleet}/device/+/reported", 1), (f"{PREFIX}/{fleet}/device/+/presence", 1)])
    time.sleep(wait)
    client.disconnect()
    client.loop_stop()
    return [found[k] for k in sorted(found)]
