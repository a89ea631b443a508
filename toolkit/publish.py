"""`edgeship publish`: put a bundle on the broker as content-addressed chunks and set the signed,
retained desired state of a device or group."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

from agent.bundle import inspect_bundle
from agent.mqtt import Broker, make_client
from agent.protocol import (bundle_index_topic, chunk_index, chunk_topic, desired_doc, device_topic,
                            group_topic, sign_message)
from toolkit.errors import BundleError, ToolkitError
from toolkit.signing import SigningKey


def publish(bundle: Path, broker: Broker, fleet: str, key: SigningKey, device: str | None = None,
            group: str | None = None, timeout: float = 120, url: str = "") -> dict[str, Any]:
    """With ``url`` (the bundle on object storage / a CDN) only the signed desired state goes over MQTT."""
    if bool(device) == bool(group):
        raise ToolkitError("publish needs exactly one of --device or --group")
    doc, _ = inspect_bundle(bundle)
    data = bundle.read_bytes()
    idx = chunk_index(data)
    sha = idx["sha256"]
    client = make_client(f"edgeship-publisher-{hashlib.sha256(str(bundle).encode()).hexdigest()[:8]}", broker)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, r, p=None: connected.set()
    try:
        client.connect(broker.host, broker.port, keepalive=30)
    except OSError as exc:
        raise ToolkitError(f"cannot reach broker {broker.host}:{broker.port} ({exc})") from exc
    client.loop_start()
    try:
        if not connected.wait(timeout):
            raise ToolkitError(f"broker {broker.host}:{broker.port} did not accept the connection")
        infos = []
        cs = idx["chunk_size"]
        for i in range(0 if url else len(idx["chunks"])):
            infos.append(client.publish(chunk_topic(fleet, sha, i), data[i * cs:(i + 1) * cs], qos=1, retain=True))
        import json

        if not url:
            infos.append(client.publish(bundle_index_topic(fleet, sha), json.dumps(idx), qos=1, retain=True))
        target = f"device:{device}" if device else f"group:{group}"
        desired = desired_doc(doc["name"], doc["version"], sha, len(data), target, url)
        topic = device_topic(fleet, device, "desired") if device else group_topic(fleet, group or "")
        infos.append(client.publish(topic, sign_message(desired, key.key_id, key.sign), qos=1, retain=True))
        for info in infos:
            info.wait_for_publish(timeout)
            if not info.is_published():
                raise BundleError(f"publishing {bundle.name} to {broker.host} timed out")
    finally:
        client.disconnect()
        client.loop_stop()
    return {"bundle": str(bundle), "sha256": sha, "chunks": len(idx["chunks"]), "target": target,
            "topic": topic, "model": doc["name"], "version": doc["version"]}
