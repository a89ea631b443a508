"""The agent's fleet link: one MQTT session that follows the device's desired state (see ``desired``),
fetches bundles (``transfer``), hands them to the install engine and reports back.

paho's callbacks run on its network thread and only enqueue; one worker thread does the real work.
What it reports is derived from what the agent serves: at start-up (after a crash in any install state)
and whenever the served model changes, the link reconciles its state with the active slot's bundle.
The MQTT client id is the broker identity (the username, or the device id that its certificate names), so no
other login can take the session over. With a root-anchored keyring (agent.trust.Trust) the link also follows
the fleet's retained keyring document; once a new one is accepted, everything is verified against it.
A desired state whose expiry passed without a renewal is reported (the agent keeps serving).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

from agent.errors import ProtocolError
from agent.fleet import delta
from agent.fleet.desired import (accept, count_attempt, expired, failure, gave_up, load_state, pending,
                                 save_state)
from agent.install import describe
from agent.fleet.mqtt import Broker, make_client
from agent.fleet.protocol import (MAX_CAPTURE_MINUTES, Desired, device_topic, encode, group_topic, keyring_topic,
                                  parse_capture_request, presence_doc, reported_doc)
from agent.fleet.reporter import Reporter, TelemetryConfig
from agent.fleet.transfer import Transfer
from agent.keys import Keyring
from agent.serve.service import Agent
from agent.trust import Trust

log = logging.getLogger(__name__)
CHECK_S = 60.0  # how often an idle link checks whether its desired state expired


class FleetLink:
    def __init__(self, agent: Agent, keyring: Keyring, broker: Broker, fleet: str, device_id: str,
                 group: str = "", telemetry: TelemetryConfig | None = TelemetryConfig()):
        self.agent, self.keyring, self.broker = agent, keyring, broker
        self.fleet, self.device, self.group = fleet, device_id, group
        self.q: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self.client = make_client(client_id(broker, fleet, device_id), broker)
        self.client.will_set(device_topic(fleet, device_id, "presence"), encode(presence_doc(False)), qos=1,
                             retain=True)
        self.desired_topics = {device_topic(fleet, device_id, "desired")} | (
            {group_topic(fleet, group)} if group else set())
        self.capture_topics = ({device_topic(fleet, device_id, "capture_request")} | (
            {group_topic(fleet, group, "capture_request")} if group else set())) if agent.capture else set()
        self._capture_seq = 0  # the last capture request applied, on disk: an old one replayed after a restart
        try:  # is ignored, and a window still open survives the restart
            applied = load_state(agent.store.dir).get("capture") or {}
            self._capture_seq = int(applied.get("seq", 0))
            if agent.capture is not None and applied:
                agent.capture.everything_until, agent.capture.upload_url = float(applied["until"]), str(applied["url"])
        except (AttributeError, KeyError, TypeError, ValueError):
            log.warning("fleet state: unreadable record of the last capture request; ignored")
        self.trust = keyring if isinstance(keyring, Trust) else None  # follows the fleet's keyring
        self.keyring_topic = keyring_topic(fleet) if self.trust else None
        self._stale = ""  # the expiry note last reported
        self._keyring_pending: bytes | None = None  # a keyring that could not be saved yet
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, msg: self.q.put((msg.topic, msg.payload))
        self.transfer = Transfer(agent, self.client, fleet, agent.store.dir / "downloads", self._install)
        self.last_transfer: dict[str, Any] = {}  # how the last bundle arrived (reported)
        self.status, self.error = "idle", ""
        self._reconcile()  # after a restart: report what is served, not what was meant
        agent.on_swap.append(lambda: self.q.put(("$swap", b"")))  # a local install/rollback changed it
        self._worker = threading.Thread(target=self._work, name="edgeship-fleet", daemon=True)
        self.reporter = Reporter(self, telemetry) if telemetry else None  # telemetry + heartbeat
        if agent.capture is not None:
            agent.capture.attach(self.client, fleet, device_id, broker)

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
        keyring = [(self.keyring_topic, 1)] if self.keyring_topic else []  # first: it decides what is trusted
        client.subscribe(keyring + [(t, 1) for t in sorted(self.desired_topics | self.capture_topics)])
        self.q.put(("$resume", b""))
        if self.reporter:
            self.reporter.wake()
        if self.agent.capture is not None:
            self.agent.capture.wake()

    # ------------------------------------------------------------ worker
    def _work(self) -> None:
        while True:
            try:
                item = self.q.get(timeout=CHECK_S)
            except queue.Empty:
                item = ("$check", b"")
            if item is None:
                return
            topic, payload = item
            self.transfer.count(topic, payload)
            try:
                if topic == "$check":
                    if self._keyring_pending is not None:
                        self._on_keyring(self.keyring_topic or "", self._keyring_pending)
                    if expired(self._load()) != self._stale:
                        self._report()
                elif topic == self.keyring_topic:
                    self._on_keyring(topic, payload)
                elif topic == "$resume":
                    self._report()
                    self._resume()
                elif topic == "$swap":
                    self._reconcile()
                    self._report()
                elif topic in self.desired_topics:  # not another device's: amqtt sends more than we asked
                    self._on_desired(topic, payload)
                elif topic in self.capture_topics and payload:
                    self._on_capture_request(topic, payload)
                elif topic.endswith("/index"):
                    self.transfer.on_index(topic, payload)
                elif "/chunk/" in topic:
                    self.transfer.on_chunk(topic, payload)
            except ProtocolError as exc:
                log.warning("ignored message: %s", exc)
                if topic in self.desired_topics or topic == self.keyring_topic:
                    self._report(error=str(exc))
            except Exception as exc:  # the link must survive anything a broker sends, or a full disk
                log.exception("error handling %s", topic)
                if topic not in self.capture_topics and topic != self.keyring_topic:  # not an update's fault
                    self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        """An error escaped while downloading or installing: the desired state failed, with its cause."""
        if self.status not in ("downloading", "installing"):
            return
        try:
            self.status, self.error = "failed", describe(exc)
            self.transfer.pending = None
            st = self._load()
            if st.get("desired"):
                st["failed_seq"], st["error"] = st["desired"].get("seq"), self.error
                self._save(st)
            self._report()
        except Exception:
            log.exception("cannot record the failure")

    def _reconcile(self) -> None:
        """Derive the state this link reports from the served model: the installed bundle is the active
        slot's; a desired state whose bundle is served is installed (whatever the last run was doing when
        it died); stale downloads go."""
        st = self._load()
        served = self.agent.installed_sha256()
        desired = st.get("desired") or {}
        changed = st.get("installed_sha256") != served
        st["installed_sha256"] = served
        if served is not None and served == desired.get("bundle_sha256"):
            self.status, self.error = "installed", ""
            changed |= st.pop("failed_seq", None) is not None
        elif (err := failure(st)) is not None:
            self.status, self.error = "failed", err
        elif self.status == "installed":
            self.status = "idle"  # a local install or rollback replaced the desired model
        if changed:
            self._save(st)
        try:
            d = pending(st)
        except ProtocolError:  # a stored desired state this agent cannot read: nothing to keep for it
            d = None
        self.transfer.prune(keep=d.sha256 if d else None)

    def _load(self) -> dict[str, Any]:
        return load_state(self.agent.store.dir)

    def _save(self, doc: dict[str, Any]) -> None:
        save_state(self.agent.store.dir, doc)

    def _on_keyring(self, topic: str, payload: bytes) -> None:
        if not payload or self.trust is None:
            return
        try:
            accepted = self.trust.offer(payload, topic)
        except OSError as exc:  # not saved (a full disk): reported, and tried again every CHECK_S
            self._keyring_pending = payload
            self._report(error=f"keyring update not saved ({exc}); retrying")
            return
        except ProtocolError:
            self._keyring_pending = None
            raise
        was_pending, self._keyring_pending = self._keyring_pending is not None, None
        if accepted is None and not was_pending:
            return
        self._report()
        # desired states and capture requests signed by a key this keyring added may have been refused before
        # it came: the broker sends the retained ones again for a repeated subscription
        self.client.subscribe([(t, 1) for t in sorted(self.desired_topics | self.capture_topics)])

    def _on_desired(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        st = self._load()
        before = st.get("desired", {}).get("expires") if st.get("desired") else None
        accepted = accept(st, topic, payload, self.keyring, self.device, self.group,
                          require_expiry=self.trust is not None)
        if accepted is None:
            if st.get("desired") and st["desired"].get("expires") != before:  # renewed by the host
                self._save(st)
                if self._stale:
                    self._report()
            return
        d, _ = accepted
        self._save(st)
        if d.rollback_to is not None:
            self._rollback(d, d.rollback_to)
            return
        if self.agent.installed_sha256() == d.sha256:  # already served: say so
            self.status, self.error = "installed", ""
            self._report()
            return
        limit = self.agent.engine.limits.max_bundle_bytes
        if d.size > limit:
            self.status, self.error = "failed", f"bundle of {d.size} bytes exceeds this device's limit of {limit}"
            st["failed_seq"], st["error"] = d.seq, self.error
            self._save(st)
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

    def _on_capture_request(self, topic: str, payload: bytes) -> None:
        """The host asks for every request until a time (signed; 0 minutes: stop). One not newer than the
        last one applied (also across restarts: a replayed old request) changes nothing; the URL of one that
        ended is not used (Capture.upload_target)."""
        req = parse_capture_request(payload, topic, self.keyring)
        if req.target not in (f"device:{self.device}", f"group:{self.group}") or req.seq <= self._capture_seq:
            return
        until = min(req.until, time.time() + 60 * MAX_CAPTURE_MINUTES)  # a clock far ahead: at most a day
        st = self._load()
        st["capture"] = {"seq": req.seq, "until": until, "url": req.url}
        self._save(st)  # first: a request not saved (full disk) is applied when the broker sends it again
        self._capture_seq = req.seq
        self.agent.capture.everything_until = until
        self.agent.capture.upload_url = req.url
        log.info("capture request: every request until %s; records go %s", time.strftime(
            "%Y-%m-%d %H:%M:%S", time.localtime(until)), f"to {req.url}" if req.url else "over MQTT")

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
        st["installed_sha256"] = self.agent.installed_sha256()
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
        try:  # the signed desired state names the model: changing the served model is explicit here
            res = self.agent.install(bundle, allow_model_change=True)
            ok, reason = res.ok, res.reason
        except Exception as exc:  # a refusal is a Result; anything else still ends the install as failed
            log.exception("install of %s", bundle)
            ok, reason = False, describe(exc)
        st = self._load()
        if ok:
            st["installed_sha256"] = self.agent.installed_sha256()
            self.status, self.error = "installed", ""
        else:
            self.status, self.error = "failed", reason
            st["failed_seq"], st["error"] = d.seq, reason
        self._save(st)
        self.transfer.done(d)
        self._report()

    def _report(self, error: str = "") -> None:
        cur, st = self.agent.current, self._load()
        self._stale = expired(st)
        doc = reported_doc(self.device, self.group, cur.manifest.name if cur else None,
                           cur.manifest.version if cur else None, self.agent.installed_sha256(), st.get("seq", 0),
                           self.status, error or self.error or self._stale, self.last_transfer, delta.available())
        self.client.publish(device_topic(self.fleet, self.device, "reported"), encode(doc), qos=1, retain=True)


def client_id(broker: Broker, fleet: str, device: str) -> str:
    """The MQTT client id: the authenticated identity (the username, or with a client certificate the device
    id its certificate names — Mosquitto enforces either with use_username_as_clientid), so one device's
    login cannot take over another device's session."""
    if broker.username:
        return broker.username
    return device if broker.cert_file else f"edgeship-{fleet}-{device}"
