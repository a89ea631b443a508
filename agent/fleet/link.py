"""The agent's fleet link: one MQTT session that follows the device's desired state (see ``desired``),
fetches bundles (``transfer``), hands them to the install engine and reports back.

paho's callbacks run on its network thread and only enqueue; one worker thread does the real work.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Any

from agent.errors import ProtocolError
from agent.fleet import delta
from agent.fleet.desired import accept, count_attempt, failure, gave_up, load_state, pending, save_state
from agent.fleet.mqtt import Broker, make_client
from agent.fleet.protocol import Desired, device_topic, encode, group_topic, presence_doc, reported_doc
from agent.fleet.reporter import Reporter, TelemetryConfig
from agent.fleet.transfer import Transfer
from agent.keys import Keyring
from agent.serve.service import Agent

log = logging.getLogger(__name__)


class FleetLink:
    def __init__(self, agent: Agent, keyring: Keyring, broker: Broker, fleet: str, device_id: str,
                 group: str = "", telemetry: TelemetryConfig | None = TelemetryConfig()):
        self.agent, self.keyring, self.broker = agent, keyring, broker
        self.fleet, self.device, self.group = fleet, device_id, group
        self.q: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self.client = make_client(f"edgeship-{fleet}-{device_id}", broker)
        self.client.will_set(device_topic(fleet, device_id, "presence"), encode(presence_doc(False)), qos=1,
                             retain=True)
        self.desired_topics = {device_topic(fleet, device_id, "desired")} | (
            {group_topic(fleet, group)} if group else set())
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, msg: self.q.put((msg.topic, msg.payload))
        self.transfer = Transfer(agent, self.client, fleet, agent.store.dir / "downloads", self._install)
        self.last_transfer: dict[str, Any] = {}  # how the last bundle arrived (reported)
        self.status, self.error = "idle", ""
        if (err := failure(self._load())) is not None:
            self.status, self.error = "failed", err  # still true after a restart
        self._worker = threading.Thread(target=self._work, name="edgeship-fleet", daemon=True)
        self.reporter = Reporter(self, telemetry) if telemetry else None  # telemetry + heartbeat

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._worker.start()
        if self.reporter:
            self.reporter.start()
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()

    def stop(self) -> None:
        if self.reporter:
            self.reporter.stop()
        info = self.client.publish(device_topic(self.fleet, self.device, "presence"), encode(presence_doc(False)),
                                   qos=1, retain=True)
        if self.client.is_connected():
            info.wait_for_publish(2.0)
        self.client.disconnect()
        self.client.loop_stop()
        self.q.put(None)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("MQTT connect refused: %s", reason)
            return
        presence = self.reporter.presence() if self.reporter else encode(presence_doc(True))
        client.publish(device_topic(self.fleet, self.device, "presence"), presence, qos=1, retain=True)
        client.subscribe([(t, 1) for t in sorted(self.desired_topics)])
        self.q.put(("$resume", b""))
        if self.reporter:
            self.reporter.wake()

    # ------------------------------------------------------------ worker
    def _work(self) -> None:
        while (item := self.q.get()) is not None:
            topic, payload = item
            self.transfer.count(topic, payload)
            try:
                if topic == "$resume":
                    self._report()
                    self._resume()
                elif topic in self.desired_topics:  # not another device's: amqtt sends more than we asked
                    self._on_desired(topic, payload)
                elif topic.endswith("/index"):
                    self.transfer.on_index(topic, payload)
                elif "/chunk/" in topic:
                    self.transfer.on_chunk(topic, payload)
            except ProtocolError as exc:
                log.warning("ignored message: %s", exc)
                if topic in self.desired_topics:
                    self._report(error=str(exc))
            except Exception:  # the link must survive anything a broker sends
                log.exception("error handling %s", topic)

    def _load(self) -> dict[str, Any]:
        return load_state(self.agent.store.dir)

    def _save(self, doc: dict[str, Any]) -> None:
        save_state(self.agent.store.dir, doc)

    def _on_desired(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        st = self._load()
        accepted = accept(st, topic, payload, self.keyring, self.device, self.group)
        if accepted is None:
            return
        d, _ = accepted
        self._save(st)
        if d.rollback_to is not None:
            self._rollback(d, d.rollback_to)
            return
        if st.get("installed_sha256") == d.sha256:
            self._report()
            return
        self.transfer.begin(d)
        self.status, self.error = "downloading", ""
        self._report()
        if not d.url:
            self.transfer.subscribe()
            return
        try:
            error = self.transfer.download_url(d)
        except ProtocolError:
            self.status = "failed"
            raise
        if error:
            self.status, self.error = "failed", error
            self._report()

    def _resume(self) -> None:
        """After (re)connecting: continue the desired state this device has not reached yet, unless it
        already failed, or the agent died during its install MAX_ATTEMPTS times."""
        st = self._load()
        d = pending(st) if self.transfer.pending is None else None
        if d is None:
            return self.transfer.subscribe()
        if (error := gave_up(st, d)) is not None:
            self.status, self.error = "failed", error
            self._save(st)
            self._report()
            return
        self.transfer.begin(d)
        self.transfer.subscribe()

    def _rollback(self, d: Desired, version: int) -> None:
        """Host-ordered rollback (a halted rollout): switch back to the previous slot."""
        cur = self.agent.current
        st = self._load()
        if cur is None or cur.manifest.version != version:
            prev = self.agent.engine.manifest_of(self.agent.store.load().get("previous"))
            if prev is None or prev.version != version:
                self.status, self.error = "failed", f"cannot roll back to v{version}: not the previous version"
                self._report()
                return
            self.agent.rollback()
        st["installed_sha256"] = d.sha256
        st.pop("desired", None)
        self._save(st)
        self.transfer.pending = None
        self.status, self.error = "rolled-back", ""
        self._report()

    def _install(self, d: Desired, bundle: Path, how: dict[str, Any]) -> None:
        self.last_transfer = how
        st = self._load()
        count_attempt(st, d)
        self._save(st)  # before the engine runs: an install that kills the process is counted
        self.status = "installing"
        self._report()
        res = self.agent.install(bundle)
        st = self._load()
        if res.ok:
            st["installed_sha256"] = d.sha256
            self.status, self.error = "installed", ""
        else:
            self.status, self.error = "failed", res.reason
            st["failed_seq"], st["error"] = d.seq, res.reason
        self._save(st)
        self.transfer.done(d)
        self._report()

    def _report(self, error: str = "") -> None:
        cur, st = self.agent.current, self._load()
        doc = reported_doc(self.device, self.group, cur.manifest.name if cur else None,
                           cur.manifest.version if cur else None, st.get("installed_sha256"), st.get("seq", 0),
                           self.status, error or self.error, self.last_transfer, delta.available())
        self.client.publish(device_topic(self.fleet, self.device, "reported"), encode(doc), qos=1, retain=True)
