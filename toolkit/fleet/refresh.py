"""`edgeship fleet refresh`: renew the fleet's retained desired states before they expire.

A desired state carries an expiry (``expires``), so a captured old one cannot hold a device on an old model
for ever (TUF's freeze attack): a device refuses an expired desired state and reports when the one it follows
expired. The host renews them: this re-signs every retained desired state of the fleet that is signed by a
key the fleet trusts and expires within ``min_left`` seconds — the same state, the same ``seq`` (devices that
handled it do nothing but note the later expiry), a later ``expires``, signed with the current signing key (so
after a rotation, refreshing moves every desired state to the new key before the old one is revoked). Run it
daily (a systemd timer or cron job next to the collector). Retained capture requests still running are moved
to the current signing key too (same document, same ``seq``), so a rotation does not cut their window short
on devices that reconnect.

It reads the retained states through a live subscription and re-checks, just before re-publishing each, that
no newer desired state arrived on that topic meanwhile (e.g. from a rollout).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from agent.errors import AgentError
from agent.fleet.mqtt import Broker
from agent.fleet.protocol import PREFIX, parse_message, refreshed, sign_message
from agent.keys import Keyring
from toolkit.fleet.publish import DESIRED_TTL, Publisher
from toolkit.fleet.watcher import FleetWatcher
from toolkit.signing import SigningKey

log = logging.getLogger(__name__)


KINDS = ("desired", "capture_request")


class DesiredWatcher(FleetWatcher):
    """The fleet's retained desired states and capture requests (device and group), live."""

    def __init__(self, broker: Broker, fleet: str):
        super().__init__(broker, fleet)
        self.desired: dict[str, bytes] = {}

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
        base = f"{PREFIX}/{self.fleet}"
        client.subscribe([(f"{base}/{level}/+/{kind}", 1) for level in ("device", "group")
                          for kind in KINDS] + [(self.sync_topic, 1)])

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        parts = msg.topic.split("/")
        if (len(parts) == 6 and msg.topic.startswith(f"{PREFIX}/{self.fleet}/") and parts[3] in ("device", "group")
                and parts[5] in KINDS):
            with self._lock:
                self.desired[msg.topic] = msg.payload
        else:
            super()._on_message(client, userdata, msg)

    def payload(self, topic: str) -> bytes | None:
        with self._lock:
            return self.desired.get(topic)


def refresh(broker: Broker, fleet: str, key: SigningKey, trusted: Keyring, ttl: float = DESIRED_TTL,
            min_left: float | None = None) -> list[dict[str, Any]]:
    """Renew the desired states that expire within ``min_left`` (default: half of ``ttl``); one row per
    retained desired state: topic, what happened, the new expiry."""
    min_left = ttl / 2 if min_left is None else min_left
    w = DesiredWatcher(broker, fleet).start()
    pub = Publisher(broker, fleet, key, ttl=ttl)
    rows = []
    try:
        w.sync()
        for topic, payload in sorted(w.desired.items()):
            row: dict[str, Any] = {"topic": topic}
            rows.append(row)
            if not payload:
                row["action"] = "cleared"
                continue
            kind = topic.rsplit("/", 1)[1]
            try:
                doc = parse_message(payload, topic, trusted, expect_type=kind)
            except AgentError as exc:
                row["action"] = f"left alone: {exc}"
                continue
            if kind == "capture_request":
                _resign_capture(pub, topic, payload, doc, key, row, w)
                continue
            if doc.get("expires") and doc["expires"] - time.time() > min_left:
                row.update(action="fresh", expires=doc["expires"])
                continue
            new = refreshed(doc, ttl)
            if w.payload(topic) != payload:  # a newer desired state arrived meanwhile: it wins
                row["action"] = "superseded while refreshing: left alone"
                continue
            pub.retain(topic, sign_message(new, key.key_id, key.sign))
            row.update(action="renewed", expires=new["expires"])
    finally:
        pub.close()
        w.stop()
    return rows


def _resign_capture(pub: Publisher, topic: str, payload: bytes, doc: dict[str, Any], key: SigningKey,
                    row: dict[str, Any], w: DesiredWatcher) -> None:
    """A capture request still running, signed by another key than the current one: the same document,
    signed again (devices that applied it ignore it: same seq)."""
    ends = float(doc.get("t", 0)) + 60 * float(doc.get("minutes", 0))
    if ends <= time.time():
        row["action"] = "capture request ended: left alone"
    elif doc.get("key_id") == key.key_id:
        row.update(action="fresh", expires=ends)
    elif w.payload(topic) != payload:  # a newer request arrived meanwhile: it wins
        row["action"] = "superseded while refreshing: left alone"
    else:
        body = {k: v for k, v in doc.items() if k not in ("sig", "key_id", "v")}
        pub.retain(topic, sign_message(body, key.key_id, key.sign))
        row.update(action="re-signed", expires=ends)
