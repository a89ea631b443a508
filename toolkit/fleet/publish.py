"""`edgeship publish`: put a bundle on the broker as content-addressed chunks and set the signed,
retained desired state of a device or group. Desired states expire after ``ttl`` (DESIRED_TTL) unless
renewed (`edgeship fleet refresh`): a device never follows a captured old one forever."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from agent.bundle import inspect_bundle
from agent.fleet.mqtt import Broker, connect_blocking, make_client
from agent.fleet import delta
from agent.fleet.protocol import (Patch, bundle_topic, delta_topic, desired_doc, device_topic, encode, group_topic,
                                  index_doc, sign_message)
from toolkit.errors import BundleError, ToolkitError
from toolkit.signing import SigningKey


DESIRED_TTL = 7 * 86400.0  # seconds a desired state stays valid without a refresh


class Publisher:
    """One connection to the broker for uploading bundles and setting desired states."""

    def __init__(self, broker: Broker, fleet: str, key: SigningKey, timeout: float = 120,
                 ttl: float = DESIRED_TTL):
        self.broker, self.fleet, self.key, self.timeout, self.ttl = broker, fleet, key, timeout, ttl
        self.client = make_client(f"edgeship-publisher-{time.time_ns()}", broker)
        connect_blocking(self.client, broker, min(timeout, 15.0))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _wait(self, infos: list[Any], what: str) -> None:
        for info in infos:
            info.wait_for_publish(self.timeout)
            if not info.is_published():
                raise BundleError(f"publishing {what} to {self.broker.host} timed out")

    def _put(self, prefix: str, data: bytes, idx: dict[str, Any]) -> list[Any]:
        cs = idx["chunk_size"]
        infos = [self.client.publish(f"{prefix}/chunk/{i}", data[i * cs:(i + 1) * cs], qos=1, retain=True)
                 for i in range(len(idx["chunks"]))]
        infos.append(self.client.publish(f"{prefix}/index", encode(idx), qos=1, retain=True))
        return infos

    def upload(self, bundle: Path, bases: list[Path] = (), sealed: Any = None) -> dict[str, Any]:
        """Retained chunks + index (content-addressed: uploading twice is harmless), plus a delta
        against each (plain) bundle in ``bases``, when smaller than the full bundle. ``sealed``: the
        toolkit.fleet.sealing.Sealed that ``bundle`` is (its deltas are made from the plaintext)."""
        doc, _ = inspect_bundle(bundle)
        data = bundle.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if "encryption" in doc and bases and (sealed is None or sealed.sha256 != sha):
            bases = []  # an encrypted bundle sealed before: its data key is gone, so full bundles only
        infos, deltas = [], {}
        for base in bases:
            if sealed is not None:
                p = delta.make_sealed_patch(base_content(base), data, sealed.manifest, sealed.signature,
                                            sealed.payload, sealed.data_key)
            else:
                p = delta.make_patch(base_content(base), data)
            if len(p["patch"]) >= len(data) or p["base_sha256"] in deltas:
                continue  # not smaller: devices on that version take the full bundle
            codec = delta.SEALED_CODEC if sealed is not None else delta.CODEC
            idx = index_doc(p["patch"], delta=Patch(sha, len(data), p["base_sha256"], codec, p["window_log"]))
            infos += self._put(delta_topic(self.fleet, sha, p["base_sha256"]), p["patch"], idx)
            deltas[p["base_sha256"]] = len(p["patch"])
        idx = index_doc(data, deltas=list(deltas))
        infos += self._put(bundle_topic(self.fleet, sha), data, idx)
        self._wait(infos, bundle.name)
        return {"sha256": sha, "size": len(data), "chunks": len(idx["chunks"]), "model": doc["name"],
                "version": doc["version"], "deltas": deltas}

    def desire(self, model: str, version: int, sha256: str, size: int, device: str | None = None,
               group: str | None = None, url: str = "", rollback_to: int | None = None) -> str:
        target = f"device:{device}" if device else f"group:{group}"
        desired = desired_doc(model, version, sha256, size, target, url, rollback_to, self.ttl)
        topic = device_topic(self.fleet, device, "desired") if device else group_topic(self.fleet, group or "")
        payload = sign_message(desired, self.key.key_id, self.key.sign)
        self.retain(topic, payload)
        self.last_seq = desired["seq"]  # devices echo it in their reported state once they handled it
        self.last_payload = payload  # what a resumed rollout re-asserts
        return topic

    def retain(self, topic: str, payload: bytes) -> None:
        """(Re-)publish a retained message, e.g. a signed desired state a broker may have lost."""
        self._wait([self.client.publish(topic, payload, qos=1, retain=True)], topic)


def retain_once(broker: Broker, topic: str, payload: bytes, what: str, error: type[ToolkitError] = ToolkitError,
                timeout: float = 30.0) -> None:
    """Retain one message on ``topic`` over a connection of its own (QoS 1, acknowledged by the broker)."""
    client = make_client(f"edgeship-{what.split()[-1]}-{time.time_ns()}", broker)
    connect_blocking(client, broker)
    try:
        info = client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise error(f"publishing {what} to {broker.host}:{broker.port} timed out")
    finally:
        client.disconnect()
        client.loop_stop()


def base_content(bundle: Path) -> bytes:
    """What a device running ``bundle`` patches against (its files in manifest order, see agent.fleet.delta)."""
    import tarfile

    doc, _ = inspect_bundle(bundle)
    if "encryption" in doc:
        raise BundleError(f"{bundle} is encrypted: give the plain bundle it was sealed from as the delta base")
    try:
        with tarfile.open(bundle) as tar:
            def read(path: str) -> bytes:
                fh = tar.extractfile(path)
                if fh is None:
                    raise KeyError(path)
                return fh.read()
            return delta.base_content(read, [f["path"] for f in doc["files"]])
    except (tarfile.TarError, KeyError, OSError) as exc:
        raise BundleError(f"{bundle}: cannot read its files for a delta ({exc})") from exc


def publish(bundle: Path, broker: Broker, fleet: str, key: SigningKey, device: str | None = None,
            group: str | None = None, timeout: float = 120, url: str = "",
            delta_from: list[Path] = (), sealed: Any = None, ttl: float = DESIRED_TTL) -> dict[str, Any]:
    """With ``url`` (the bundle on object storage / a CDN) only the signed desired state goes over MQTT.
    ``sealed``: ``bundle`` is this sealed copy (toolkit.fleet.sealing.seal_bundle)."""
    if bool(device) == bool(group):
        raise ToolkitError("publish needs exactly one of --device or --group")
    pub = Publisher(broker, fleet, key, timeout, ttl)
    try:
        if url:
            doc, _ = inspect_bundle(bundle)
            data = bundle.read_bytes()
            info = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "chunks": 0,
                    "model": doc["name"], "version": doc["version"]}
        else:
            info = pub.upload(bundle, list(delta_from), sealed)
        topic = pub.desire(info["model"], info["version"], info["sha256"], info["size"], device, group, url)
    finally:
        pub.close()
    return {**info, "bundle": str(bundle), "target": f"device:{device}" if device else f"group:{group}",
            "topic": topic}
