"""The fleet protocol over MQTT (version 1): topics, signed messages and content-addressed chunks.

Owned by the agent (the device consumes it); the host publishes through these helpers.
See docs/protocol.md.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Callable

from agent.errors import AgentError, ProtocolError
from agent.keys import Keyring
from agent.manifest import canonical_json

VERSION = 1
PREFIX = f"edgeship/v{VERSION}"
CHUNK_SIZE = 64 * 1024
MAX_MESSAGE_BYTES = 256 * 1024


def device_topic(fleet: str, device: str, kind: str) -> str:
    """kind: desired | reported | presence | telemetry"""
    return f"{PREFIX}/{fleet}/device/{device}/{kind}"


def group_topic(fleet: str, group: str) -> str:
    return f"{PREFIX}/{fleet}/group/{group}/desired"


def bundle_topic(fleet: str, sha256: str) -> str:
    """Prefix of a bundle's transfer topics: ``.../index`` and ``.../chunk/{i}``."""
    return f"{PREFIX}/{fleet}/bundle/{sha256}"


def delta_topic(fleet: str, sha256: str, base_sha256: str) -> str:
    """Prefix of a delta's index and chunks: the bundle ``sha256`` as a patch against a model file."""
    return f"{PREFIX}/{fleet}/bundle/{sha256}/delta/{base_sha256}"


def chunk_index(data: bytes, chunk_size: int = CHUNK_SIZE, **extra: Any) -> dict[str, Any]:
    chunks = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)]
    return {"v": VERSION, "type": "index", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
            "chunk_size": chunk_size, "chunks": [hashlib.sha256(c).hexdigest() for c in chunks], **extra}


def sign_message(doc: dict[str, Any], key_id: str, sign: Callable[[bytes], bytes]) -> bytes:
    import base64

    body = dict(doc, v=VERSION, key_id=key_id)
    body.pop("sig", None)
    body["sig"] = base64.b64encode(sign(canonical_json(body))).decode()
    return json.dumps(body, sort_keys=True).encode()


def parse_message(payload: bytes, topic: str, keyring: Keyring | None = None,
                  expect_type: str | None = None) -> dict[str, Any]:
    """Decode (and, with a keyring, verify) a JSON message; ProtocolError says what is wrong."""
    import base64

    if len(payload) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"{topic}: message of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"{topic}: not JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("v") != VERSION:
        raise ProtocolError(f"{topic}: not an edgeship v{VERSION} message")
    if expect_type and doc.get("type") != expect_type:
        raise ProtocolError(f"{topic}: expected a {expect_type!r} message, got {doc.get('type')!r}")
    if keyring is not None:
        sig = doc.pop("sig", None)
        if not isinstance(sig, str) or not isinstance(doc.get("key_id"), str):
            raise ProtocolError(f"{topic}: unsigned message")
        try:
            raw = base64.b64decode(sig, validate=True)
        except ValueError as exc:
            raise ProtocolError(f"{topic}: malformed signature") from exc
        try:
            keyring.verify(doc["key_id"], canonical_json(doc), raw, topic)
        except AgentError as exc:
            raise ProtocolError(str(exc)) from exc
    return doc


@dataclass(frozen=True)
class Desired:
    """What the host wants a device (or group) to run."""

    model: str
    version: int
    sha256: str
    size: int
    seq: int
    url: str = ""

    @classmethod
    def from_doc(cls, doc: dict[str, Any], topic: str) -> "Desired":
        try:
            d = cls(str(doc["model"]), int(doc["version"]), str(doc["bundle_sha256"]), int(doc["bundle_size"]),
                    int(doc["seq"]), str(doc.get("url", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"{topic}: desired state lacks or mistypes {exc}") from exc
        if len(d.sha256) != 64 or d.size <= 0:
            raise ProtocolError(f"{topic}: bad bundle hash or size")
        return d


def desired_doc(model: str, version: int, sha256: str, size: int, target: str, url: str = "") -> dict[str, Any]:
    return {"type": "desired", "model": model, "version": version, "bundle_sha256": sha256,
            "bundle_size": size, "target": target, "seq": time.time_ns(), "url": url}
