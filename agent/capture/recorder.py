"""The agent's capture: the inline decision, a hand-off to one worker thread that encodes, budgets and
queues captured records on disk, the ring of recent predictions that field labels refer to, and the
sender that takes records and labels home over MQTT (QoS 1, deleted only once acknowledged).

Nothing of this exists when ``[capture]`` is off: no thread, no file, no per-request work.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from agent.capture.feedback import MAX_ID
from agent.errors import HTTPError
from agent.capture.policy import CaptureConfig, Decider, confidence
from agent.fleet.capture_wire import encode_record, pack
from agent.fleet.outbox import Outbox, publish_acked
from agent.fleet.protocol import device_topic, label_doc, telemetry_payload

if TYPE_CHECKING:
    from agent.serve.service import Loaded

log = logging.getLogger(__name__)
HANDOFF = 256  # captured requests waiting for the worker; beyond, they are dropped (and counted)
CAPTURE_FILE, LABELS_FILE = "capture.db", "labels.db"  # in the state dir
SEND_EVERY_S = 1.0
UPLOAD_GRACE_S = 600.0  # after a capture request's window: its URL still takes what it captured


class Recent(NamedTuple):  # (made for every request: a tuple is cheaper than a dataclass)
    """What the agent answered to one request (for field labels)."""

    model: str
    version: int
    t: float
    predicted: tuple[int, ...]
    confidence: tuple[float, ...]
    captured: bool
    classes: int
    names: tuple[str, ...] = ()  # the answering version's label names (the manifest's own tuple)


class Capture:
    def __init__(self, cfg: CaptureConfig, state_dir: Path):
        self.cfg = cfg
        self.outbox = Outbox(state_dir / CAPTURE_FILE, cfg.queue_max, cfg.queue_bytes)
        self.labels = Outbox(state_dir / LABELS_FILE, cfg.labels_max)
        self.everything_until = 0.0  # capture every request until then (a host's capture request)
        self.upload_url = ""  # a host's capture request may say: POST records there instead of MQTT
        self._upload_wait = self._upload_retry = 0.0  # backoff after a failed upload (1 s doubling to 30 s)
        self._q: queue.Queue[tuple | None] = queue.Queue(HANDOFF)
        self._recent: OrderedDict[str, Recent] = OrderedDict()
        self._rlock = threading.Lock()
        self._decider: tuple[Any, Decider] | None = None
        self._handoff_dropped = 0
        self._spent: tuple[int, int] | None = None  # (day, bytes) of the budget, read once from the queue
        self._link: tuple[Any, str, str] | None = None  # (paho client, fleet, device) once a fleet link attaches
        self._tls: Any = None  # the TLS context uploads use: the fleet's CA and this device's certificate
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgeship-capture", daemon=True)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "Capture":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._q.put(None)
        self._thread.join(10)
        self.outbox.close()
        self.labels.close()

    def attach(self, client: Any, fleet: str, device: str, broker: Any = None) -> None:
        """Send home over this MQTT client (called by the fleet link). An upload URL (a capture request's)
        is reached over HTTPS trusting the system's CAs and the broker's CA file, with the broker's client
        certificate when it has one: a receiver behind TLS can check which device sends."""
        if broker is not None and (broker.ca_file or broker.cert_file):
            import ssl

            ctx = ssl.create_default_context()
            if broker.ca_file:
                ctx.load_verify_locations(broker.ca_file)
            if broker.cert_file:
                ctx.load_cert_chain(broker.cert_file, broker.key_file)
            self._tls = ctx
        self._link = (client, fleet, device)
        self._wake.set()

    def upload_target(self, now: float | None = None) -> str:
        """The URL records go to: a capture request's, while its window lasts (and UPLOAD_GRACE_S after, to
        drain what it captured); "" (over MQTT) otherwise."""
        now = time.time() if now is None else now
        return self.upload_url if now < self.everything_until + UPLOAD_GRACE_S else ""

    def wake(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------ request path
    @staticmethod
    def new_id() -> str:
        return os.urandom(8).hex()

    def offer(self, cur: "Loaded", arrays: list[np.ndarray], out: dict[str, np.ndarray],
              request_id: str | None) -> None:
        """Inline: decide, remember the prediction, hand a captured request to the worker (no copy here:
        the arrays belong to this request)."""
        if cur.runner.plan.stateful:
            return  # a sample of a stateful model means nothing without its sequence
        if request_id is not None and not 0 < len(request_id) <= MAX_ID:
            request_id = None  # (the HTTP API refuses such ids) neither remembered nor sent with a record
        d = self._decider
        if d is None or d[0] is not cur:
            d = self._decider = (cur, Decider(self.cfg, cur.manifest))
        conf = confidence(out, d[1].outputs)
        t = time.time()
        reasons = d[1].reasons(arrays, conf, t < self.everything_until)
        if request_id is not None and conf is not None:
            rec = Recent(cur.manifest.name, cur.manifest.version, t, conf.top, conf.p1, bool(reasons), conf.classes,
                         cur.manifest.labels)
            with self._rlock:
                self._recent[request_id] = rec
                self._recent.move_to_end(request_id)
                while len(self._recent) > self.cfg.recent:
                    self._recent.popitem(last=False)
        if reasons:
            try:
                self._q.put_nowait((cur, arrays, out, request_id, t, reasons))
            except queue.Full:
                self._handoff_dropped += 1

    def recent(self, request_id: str) -> Recent | None:
        with self._rlock:
            return self._recent.get(request_id)

    def feedback(self, request_id: str, rec: Recent, labels: list[int]) -> None:
        """Queue a field label for a request this agent answered (sent home with the labels outbox)."""
        doc = label_doc("", request_id, rec.model, rec.version, rec.t, labels, list(rec.predicted),
                        list(rec.confidence), rec.captured)
        try:
            self.labels.put("", doc)
        except (sqlite3.Error, OSError) as exc:  # e.g. a full disk: the client hears it, the agent goes on
            raise HTTPError(507, f"{LABELS_FILE}: the label could not be stored ({exc}); nothing was kept") from exc
        self._wake.set()

    def status(self) -> dict[str, Any]:
        return {"queued": len(self.outbox), "dropped": self.outbox.get("dropped") + self._handoff_dropped,
                "over_budget": self.outbox.get("over_budget"), "budget_used": self._budget_used(time.time()),
                "labels_queued": len(self.labels), "everything_until": self.everything_until or None}

    # ------------------------------------------------------------ worker
    def _loop(self) -> None:
        last_send = 0.0
        while True:
            try:
                item = self._q.get(timeout=SEND_EVERY_S)
            except queue.Empty:
                item = ()
            if item is None:
                break
            try:
                if item:
                    self._store(*item)
                if self._handoff_dropped:
                    n, self._handoff_dropped = self._handoff_dropped, 0
                    self.outbox.add("dropped", n)
                if self._link is not None and (self._wake.is_set() or time.monotonic() - last_send >= SEND_EVERY_S):
                    self._wake.clear()
                    last_send = time.monotonic()
                    self.send()
            except Exception:  # capture must never take the agent down
                log.exception("capture")

    def _store(self, cur: "Loaded", arrays: list[np.ndarray], out: dict[str, np.ndarray], request_id: str | None,
               t: float, reasons: list[str]) -> None:
        m = cur.manifest
        meta = {"id": request_id or self.new_id(), "model": m.name, "version": m.version, "t": t,
                "reasons": reasons, "layout": cur.model.layout}
        blob = encode_record(meta, [(s.name, a) for s, a in zip(cur.runner.inputs, arrays)],
                             [(s.name, out[s.name]) for s in cur.runner.outputs if s.name in out])
        day, used = self._budget(t)
        if used + len(blob) > self.cfg.budget_bytes:
            self.outbox.add("over_budget", 1)
            return
        self.outbox.put_raw("", blob, {"budget_day": day, "budget_used": used + len(blob)})
        self._spent = (day, used + len(blob))  # once stored: saved with the record in one transaction

    def _budget(self, t: float) -> tuple[int, int]:
        """(UTC day, bytes captured that day): a new day starts from zero."""
        day = int(t // 86400)
        if self._spent is None:
            self._spent = (self.outbox.get("budget_day"), self.outbox.get("budget_used"))
        return (day, self._spent[1]) if self._spent[0] == day else (day, 0)

    def _budget_used(self, t: float) -> int:
        return self._budget(t)[1]

    # ------------------------------------------------------------ sender
    def send(self) -> int:
        """Send queued labels and captured records while connected; returns how many were acknowledged."""
        link = self._link
        if link is None:
            return 0
        client, fleet, device = link
        sent = 0
        label_topic, capture_topic = device_topic(fleet, device, "label"), device_topic(fleet, device, "capture")
        while client.is_connected():
            rows, dropped = self.labels.peek(100)
            if not rows:
                break
            acked = publish_acked(client, [(seq, label_topic, telemetry_payload({**doc, "device": device}, seq,
                                                                                 dropped))
                                           for seq, _, doc in rows])
            if acked is None:
                return sent
            self.labels.ack(acked)
            sent += sum(1 for seq, _, _ in rows if seq <= acked)
            if acked != rows[-1][0]:
                return sent
        url = self.upload_target()
        while url or client.is_connected():
            rows, dropped = self.outbox.peek_raw(50)
            if not rows:
                break
            msgs = pack(device, [(seq, blob) for seq, _, blob in rows], dropped, self.outbox.get("over_budget"))
            if url:
                if time.monotonic() < self._upload_retry:
                    return sent
                acked = upload(url, fleet, device, msgs, self._tls)
                self._upload_wait = 0.0 if acked is not None else min(30.0, max(1.0, 2 * self._upload_wait))
                self._upload_retry = time.monotonic() + self._upload_wait
            else:
                acked = publish_acked(client, [(seq, capture_topic, payload) for seq, payload in msgs])
            if acked is None or acked < rows[0][0]:
                return sent
            self.outbox.ack(acked)
            sent += sum(1 for seq, _, _ in rows if seq <= acked)
            if acked != rows[-1][0]:
                return sent
        return sent


def upload(url: str, fleet: str, device: str, msgs: list[tuple[int, bytes]], tls: Any = None,
           timeout: float = 30.0) -> int | None:
    """POST capture messages in order to the URL a capture request gave (what `edgeship capture receive`
    serves); returns the seq acknowledged (a 2xx answer) without a gap, None when none was."""
    import urllib.error
    import urllib.request

    acked = None
    for seq, payload in msgs:
        req = urllib.request.Request(url, payload, {"Content-Type": "application/vnd.edgeship.capture",
                                                    "X-Edgeship-Fleet": fleet, "X-Edgeship-Device": device},
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=tls if url.startswith("https:") else None) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code != 422:  # not acknowledged: sent again later
                log.warning("capture upload to %s failed: %s", url, exc)
                break
            log.warning("capture upload to %s: the host refused message %d for good (%s)", url, seq, exc)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            log.warning("capture upload to %s failed: %s", url, exc)
            break
        acked = seq
    return acked
