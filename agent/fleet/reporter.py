"""The telemetry reporter: every interval a record goes into the on-disk outbox, then the outbox is
flushed to the broker in order (QoS 1, deleted only once acknowledged). A heartbeat refreshes the
retained presence message so the host can tell a silent device from an idle one.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.fleet.outbox import Outbox, publish_acked
from agent.fleet.protocol import device_topic, encode, presence_doc, telemetry_doc, telemetry_payload
from agent.fleet.telemetry import PSI_THRESHOLD, System

if TYPE_CHECKING:
    from agent.fleet.link import FleetLink

log = logging.getLogger(__name__)
BATCH = 100
OUTBOX_FILE = "telemetry.db"  # in the state dir


@dataclass(frozen=True)
class TelemetryConfig:
    interval: float = 10.0  # seconds between records (0: no telemetry records, heartbeat only)
    heartbeat: float = 30.0  # seconds between presence refreshes (0: presence only on connect / last will)
    queue_max: int = 10_000  # records kept while the broker is unreachable (oldest dropped first)
    drift_psi: float = PSI_THRESHOLD  # PSI above which drift is flagged
    drift_every: int = 1  # bin every Nth request's inputs


class Reporter:
    def __init__(self, link: "FleetLink", cfg: TelemetryConfig):
        self.link, self.cfg = link, cfg
        agent = link.agent
        agent.drift_every = cfg.drift_every
        self.outbox = Outbox(agent.store.dir / OUTBOX_FILE, cfg.queue_max)
        self.system = System(agent.store.dir)
        self.topic = device_topic(link.fleet, link.device, "telemetry")
        self._stop, self._wake = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgeship-telemetry", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(5)
        self.outbox.close()

    def wake(self) -> None:
        """Flush now (called on reconnect)."""
        self._wake.set()

    def presence(self) -> bytes:
        return encode(presence_doc(True, self.cfg.heartbeat))

    def record(self) -> dict[str, Any]:
        agent, link = self.link.agent, self.link
        cur = agent.current
        return telemetry_doc(link.device, link.group, self.cfg.interval, cur.manifest.name if cur else None,
                             cur.manifest.version if cur else None,
                             cur.window.snapshot() if cur else {"count": 0, "errors": 0},
                             cur.drift.snapshot(self.cfg.drift_psi) if cur else None, self.system.snapshot(),
                             {"status": link.status, "error": link.error})

    def tick(self) -> None:
        self.outbox.put(self.topic, self.record())

    def flush(self) -> int:
        """Send queued records in order while connected; returns how many were acknowledged."""
        client, sent = self.link.client, 0
        while client.is_connected() and not self._stop.is_set():
            rows, dropped = self.outbox.peek(BATCH)
            if not rows:
                break
            acked = publish_acked(client, [(seq, topic, telemetry_payload(record, seq, dropped))
                                           for seq, topic, record in rows])
            if acked is None:
                break
            self.outbox.ack(acked)
            sent += sum(1 for seq, _, _ in rows if seq <= acked)
            if acked != rows[-1][0]:
                break
        return sent

    def _loop(self) -> None:
        inf = float("inf")
        next_rec = time.monotonic() + self.cfg.interval if self.cfg.interval > 0 else inf
        next_beat = time.monotonic() + self.cfg.heartbeat if self.cfg.heartbeat > 0 else inf
        while not self._stop.is_set():
            self._wake.wait(min(3600.0, max(0.0, min(next_rec, next_beat) - time.monotonic())))
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                now = time.monotonic()
                if now >= next_rec:
                    next_rec = now + self.cfg.interval
                    self.tick()
                if now >= next_beat:
                    next_beat = now + self.cfg.heartbeat
                    if self.link.client.is_connected():
                        self.link.client.publish(device_topic(self.link.fleet, self.link.device, "presence"),
                                                 self.presence(), qos=1, retain=True)
                self.flush()
            except Exception:  # telemetry must never take the agent down
                log.exception("telemetry")
