"""The host's capture request: a signed, retained message that asks a device or group to capture every
request until a time (agent/fleet/protocol.py, capture_request)."""

from __future__ import annotations

from agent.fleet.mqtt import Broker, connect_blocking, make_client
from agent.fleet.protocol import capture_request_doc, device_topic, group_topic, sign_message
from toolkit.errors import ToolkitError
from toolkit.signing import SigningKey


def send_request(broker: Broker, fleet: str, key: SigningKey, minutes: float, device: str | None = None,
                 group: str | None = None, url: str = "", timeout: float = 30.0) -> str:
    import time

    target = f"device:{device}" if device else f"group:{group}"
    topic = (device_topic(fleet, device, "capture_request") if device
             else group_topic(fleet, group or "", "capture_request"))
    payload = sign_message(capture_request_doc(target, minutes, url), key.key_id, key.sign)
    client = make_client(f"edgeship-capture-{time.time_ns()}", broker)
    connect_blocking(client, broker)
    try:
        info = client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise ToolkitError(f"publishing the capture request to {broker.host}:{broker.port} timed out")
    finally:
        client.disconnect()
        client.loop_stop()
    return topic
