"""The host's capture request: a signed, retained message that asks a device or group to capture every
request until a time (agent/fleet/protocol.py, capture_request)."""

from __future__ import annotations

from agent.fleet.mqtt import Broker
from agent.fleet.protocol import capture_request_doc, device_topic, group_topic, sign_message
from toolkit.fleet.publish import retain_once
from toolkit.signing import SigningKey


def send_request(broker: Broker, fleet: str, key: SigningKey, minutes: float, device: str | None = None,
                 group: str | None = None, url: str = "", timeout: float = 30.0) -> str:
    target = f"device:{device}" if device else f"group:{group}"
    topic = (device_topic(fleet, device, "capture_request") if device
             else group_topic(fleet, group or "", "capture_request"))
    payload = sign_message(capture_request_doc(target, minutes, url), key.key_id, key.sign)
    retain_once(broker, topic, payload, "the capture request", timeout=timeout)
    return topic
