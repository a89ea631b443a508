"""The agent's fleet link: follow the desired state over MQTT, download bundles in content-addressed
chunks (resumable: finished chunks live on disk), hand them to the install engine, report back.

paho's callbacks run on its network thread and only enqueue; one worker thread does the real work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from agent.keys import Keyring
from agent.fleet.mqtt import Broker, make_client
from agent.fleet import delta
from agent.errors import DeltaError, ProtocolError
from agent.fleet.protocol import (Desired, bundle_topic, delta_topic, device_topic, group_topic,
                            parse_message)
from agent.fleet.reporter import Reporter, TelemetryConfig
from agent.serve.service import Agent
from agent.store import atomic_write

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3  # installs of one desired state that may kill the agent before it gives up
STATE_FILE = "fleet.json"  # in the state dir: last desired state, its seq, installed bundle, attempts


def load_state(state_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {"seq": 0, "installed_sha256": None}


def failure(st: dict[str, Any]) -> str | None:
    """Why the device gave up on its current desired state (None: it has not)."""
    desired = st.get("desired")
    return st.get("error", "") if desired and st.get("failed_seq") == desired.get("seq") else None


def state_summary(state_dir: Path) -> dict[str, Any] | None:
    """The fleet state for `edgeship-agent status` (None: this device never followed a fleet)."""
    if not (state_dir / STATE_FILE).exists():
        return None
    st = load_state(state_dir)
    desired = st.get("desired")
    return {"desired": {k: desired.get(k) for k in ("model", "version", "bundle_sha256", "target")} if desired
            else None, "installed_sha256": st.get("installed_sha256"), "error": failure(st)}


class FleetLink:
    def __init__(self, agent: Agent, keyring: Keyring, broker: Broker, fleet: str, device_id: str,
                 group: str = "", telemetry: TelemetryConfig | None = TelemetryConfig()):
        self.agent, self.keyring, self.broker = agent, keyring, broker
        self.fleet, self.device, self.group = fleet, device_id, group
        self.dir = agent.store.dir / "downloads"
        self.dir.mkdir(exist_ok=True)
        self.q: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self.client = make_client(f"edgeship-{fleet}-{device_id}", broker)
        self.client.will_set(device_topic(fleet, device_id, "presence"),
                             json.dumps({"v": 1, "type": "presence", "online": False}), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, msg: self.q.put((msg.topic, msg.payload))
        self.pending: dict[str, Any] | None = None  # the transfer in progress (see _begin)
        self.rx_bytes = 0  # bundle bytes received for the current transfer (chunks + indexes)
        self.transfer: dict[str, Any] = {}
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
        info = self.client.publish(device_topic(self.fleet, self.device, "presence"),
                                   json.dumps({"v": 1, "type": "presence", "online": False}), qos=1, retain=True)
        if self.client.is_connected():
            info.wait_for_publish(2.0)
        self.client.disconnect()
        self.client.loop_stop()
        self.q.put(None)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("MQTT connect refused: %s", reason)
            return
        presence = self.reporter.presence() if self.reporter else json.dumps(
            {"v": 1, "type": "presence", "online": True, "t": time.time()})
        client.publish(device_topic(self.fleet, self.device, "presence"), presence, qos=1, retain=True)
        subs = [(device_topic(self.fleet, self.device, "desired"), 1)]
        if self.group:
            subs.append((group_topic(self.fleet, self.group), 1))
        client.subscribe(subs)
        self.q.put(("$resume", b""))
        if self.reporter:
            self.reporter.wake()

    # ------------------------------------------------------------ worker
    def _work(self) -> None:
        while (item := self.q.get()) is not None:
            topic, payload = item
            if "/bundle/" in topic:
                self.rx_bytes += len(payload)  # counted here, in order with _begin's reset
            try:
                if topic == "$resume":
                    self._report()
                    self._resubscribe()
                elif topic.endswith("/desired"):
                    self._on_desired(topic, payload)
                elif topic.endswith("/index"):
                    self._on_index(topic, payload)
                elif "/chunk/" in topic:
                    self._on_chunk(topic, payload)
            except ProtocolError as exc:
                log.warning("ignored message: %s", exc)
                if topic.endswith("/desired"):
                    self._report(error=str(exc))
            except Exception:  # the link must survive anything a broker sends
                log.exception("error handling %s", topic)

    def _load(self) -> dict[str, Any]:
        return load_state(self.agent.store.dir)

    def _save(self, doc: dict[str, Any]) -> None:
        atomic_write(self.agent.store.dir / STATE_FILE, json.dumps(doc).encode())

    def _on_desired(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        doc = parse_message(payload, topic, self.keyring, expect_type="desired")
        target = doc.get("target", "")
        if target not in (f"device:{self.device}", f"group:{self.group}"):
            raise ProtocolError(f"{topic}: desired state for {target!r}, not for this device")
        d = Desired.from_doc(doc, topic)
        st = self._load()
        seen = st.setdefault("topic_seq", {}).get(topic, 0)
        if d.seq < seen:  # older than what this topic already said: a replay or a broker restoring old state
            raise ProtocolError(f"{topic}: stale desired state {d.model} v{d.version} (seq {d.seq} < {seen}) ignored")
        if d.seq <= st.get("seq", 0):  # the same message again, or superseded by the other desired topic
            log.info("desired state %s v%d already handled or superseded", d.model, d.version)
            return
        st["seq"] = st["topic_seq"][topic] = d.seq
        st["desired"] = doc
        self._save(st)
        if doc.get("rollback_to") is not None:
            self._rollback(d, int(doc["rollback_to"]))
            return
        if st.get("installed_sha256") == d.sha256:
            self._report()
            return
        self._begin(d)
        self.status, self.error = "downloading", ""
        self._report()
        if d.url:
            self._download_url(d)
            return
        self.client.subscribe(f"{self.pending['prefix']}/index", qos=1)

    def _download_url(self, d: Desired) -> None:
        """HTTP(S) transfer (object storage / CDN): resumable with Range, verified like MQTT chunks."""
        import urllib.error
        import urllib.request

        part = self.dir / f"{d.sha256}.part"
        have = part.stat().st_size if part.exists() else 0
        req = urllib.request.Request(d.url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp, open(part, "ab" if have else "wb") as out:
                if have and resp.status != 206:  # server ignored Range: start over
                    out.seek(0)
                    out.truncate()
                while chunk := resp.read(1 << 16):
                    out.write(chunk)
                    if out.tell() > d.size:
                        raise ProtocolError(f"{d.url}: more than the announced {d.size} bytes")
        except (urllib.error.URLError, OSError) as exc:
            self.status, self.error = "failed", f"download from {d.url} failed: {exc}"
            self.pending = None
            self._report()
            return
        bundle = self.dir / f"{d.sha256}.bundle"
        h = hashlib.sha256()
        with open(part, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != d.sha256:
            part.unlink(missing_ok=True)
            self.status, self.pending = "failed", None
            raise ProtocolError(f"{d.url}: downloaded file does not match bundle_sha256")
        part.rename(bundle)
        self.transfer = {"mode": "url", "bytes": d.size, "bundle_bytes": d.size}
        self._install(d, bundle)

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
        self.pending, self.status, self.error = None, "rolled-back", ""
        self._report()

    def _resubscribe(self) -> None:
        """After (re)connecting: continue the desired state this device has not reached yet, unless it
        already failed, or the agent died during its install MAX_ATTEMPTS times (a new desired state,
        even for the same bundle, starts over)."""
        st = self._load()
        doc = st.get("desired")
        if not doc or st.get("installed_sha256") == doc.get("bundle_sha256") or self.pending is not None:
            return self._subscribe_pending()
        if failure(st) is not None:
            return
        d = Desired.from_doc(doc, STATE_FILE)
        tries = st.get("attempts") or {}
        if tries.get("seq") == d.seq and tries.get("n", 0) >= MAX_ATTEMPTS:
            self.status = "failed"
            self.error = (f"gave up on {d.model} v{d.version}: the agent stopped during its install "
                          f"{tries['n']} times")
            st["failed_seq"], st["error"] = d.seq, self.error
            self._save(st)
            self._report()
            return
        self._begin(d)
        self._subscribe_pending()

    def _subscribe_pending(self) -> None:
        if self.pending:
            self.client.subscribe(f"{self.pending['prefix']}/index", qos=1)

    def _begin(self, d: Desired) -> None:
        old = self.pending
        if old:  # a newer desired state replaces a transfer in progress
            self.client.unsubscribe([f"{old['prefix']}/index"]
                                    + [f"{old['prefix']}/chunk/{i}" for i in sorted(old.get("missing", ()))])
        self.pending = {"desired": d, "index": None, "base": None, "no_delta": False,
                        "prefix": bundle_topic(self.fleet, d.sha256)}
        self.rx_bytes = 0

    def _delta_base(self, idx: dict[str, Any]) -> str | None:
        """The hash of our patch base when the index offers a patch against it (and we can apply one)."""
        cur = self.agent.current
        if cur is None or self.pending is None or self.pending["no_delta"] or not delta.available():
            return None
        offered = idx.get("deltas")
        if not isinstance(offered, list) or not offered:
            return None
        sha = hashlib.sha256(self._base_content()).hexdigest()
        return sha if sha in offered else None

    def _base_content(self) -> bytes:
        cur = self.agent.current
        assert cur is not None
        folder = self.agent.store.slot(cur.slot)
        return delta.base_content(lambda p: (folder / p).read_bytes(), [f.path for f in cur.manifest.files])

    def _on_index(self, topic: str, payload: bytes) -> None:
        p = self.pending
        if not p or not payload or topic != f"{p['prefix']}/index":
            return
        idx = parse_message(payload, topic, None, expect_type="index")
        d: Desired = p["desired"]
        if p["base"]:
            meta = idx.get("delta")
            if (not isinstance(meta, dict) or meta.get("target_sha256") != d.sha256
                    or meta.get("target_size") != d.size or meta.get("base_sha256") != p["base"]
                    or meta.get("codec") != delta.CODEC or not isinstance(meta.get("window_log"), int)):
                raise ProtocolError(f"{topic}: delta index does not match the desired bundle")
        elif idx.get("sha256") != d.sha256 or idx.get("size") != d.size:
            raise ProtocolError(f"{topic}: index does not match the desired bundle")
        chunks, size, cs = idx.get("chunks"), idx.get("size"), idx.get("chunk_size")
        if (not isinstance(chunks, list) or not isinstance(size, int) or not isinstance(cs, int) or cs <= 0
                or len(chunks) != -(-size // cs) or not all(isinstance(c, str) for c in chunks)):
            raise ProtocolError(f"{topic}: malformed chunk list")
        self.client.unsubscribe(topic)
        if not p["base"] and (base := self._delta_base(idx)):
            p["base"], p["prefix"] = base, delta_topic(self.fleet, d.sha256, base)
            log.info("bundle %s: fetching a delta against model %s", d.sha256[:12], base[:12])
            self.client.subscribe(f"{p['prefix']}/index", qos=1)
            return
        p["index"] = idx
        folder = self._folder()
        folder.mkdir(exist_ok=True)
        missing = [i for i, h in enumerate(chunks) if not self._have(folder, i, h)]
        p["missing"] = set(missing)
        if not missing:
            self._assemble()
            return
        self.client.subscribe([(f"{p['prefix']}/chunk/{i}", 1) for i in missing])

    def _folder(self) -> Path:
        p = self.pending
        assert p is not None
        sha = p["desired"].sha256
        return self.dir / (f"{sha}.delta-{p['base']}" if p["base"] else sha)

    @staticmethod
    def _have(folder: Path, i: int, sha: str) -> bool:
        f = folder / f"{i}.chunk"
        return f.is_file() and hashlib.sha256(f.read_bytes()).hexdigest() == sha

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        p = self.pending
        if not p or not p.get("index") or not topic.startswith(f"{p['prefix']}/chunk/"):
            return  # late duplicate, or a chunk of another transfer
        i = int(topic.rsplit("/", 1)[1])
        if i not in p["missing"]:
            return  # a duplicate of a chunk we already stored (or not a chunk of this bundle)
        if hashlib.sha256(payload).hexdigest() != p["index"]["chunks"][i]:
            log.warning("%s: chunk hash mismatch, waiting for a good copy", topic)
            return
        folder = self._folder()
        atomic_write(folder / f"{i}.chunk", payload, durable=False)  # re-checked by hash on resume
        self.client.unsubscribe(topic)
        p["missing"].discard(i)
        if not p["missing"]:
            self._assemble()

    def _assemble(self) -> None:
        p = self.pending
        assert p is not None
        d: Desired = p["desired"]
        idx, folder = p["index"], self._folder()
        bundle = self.dir / f"{d.sha256}.bundle"
        h = hashlib.sha256()
        with open(bundle if not p["base"] else folder / "patch", "wb") as out:  # streamed: no bundle-sized buffer
            for k in range(len(idx["chunks"])):
                data = (folder / f"{k}.chunk").read_bytes()
                h.update(data)
                out.write(data)
        if h.hexdigest() != idx["sha256"]:
            shutil.rmtree(folder, ignore_errors=True)
            bundle.unlink(missing_ok=True)
            raise ProtocolError(f"bundle {d.sha256[:12]}: assembled file does not match its hash")
        mode = "full"
        if p["base"]:
            try:
                self._apply_delta(p, folder / "patch", bundle)
                mode = "delta"
            except (DeltaError, OSError, ValueError) as exc:
                log.warning("bundle %s: %s; falling back to the full bundle", d.sha256[:12], exc)
                shutil.rmtree(folder, ignore_errors=True)
                p.update(base=None, index=None, no_delta=True, prefix=bundle_topic(self.fleet, d.sha256))
                self.client.subscribe(f"{p['prefix']}/index", qos=1)
                return
        self.transfer = {"mode": mode, "bytes": self.rx_bytes, "bundle_bytes": d.size}
        self._install(d, bundle)

    def _apply_delta(self, p: dict[str, Any], patch: Path, bundle: Path) -> None:
        d: Desired = p["desired"]
        if self.agent.current is None:
            raise DeltaError("no active bundle to apply the patch to")
        base = self._base_content()
        if hashlib.sha256(base).hexdigest() != p["base"]:
            raise DeltaError("the bundle the patch is based on is no longer active")
        data = delta.apply_patch(base, patch.read_bytes(), d.sha256, d.size, int(p["index"]["delta"]["window_log"]))
        atomic_write(bundle, data, durable=False)  # verified again by the install engine

    def _install(self, d: Desired, bundle: Path) -> None:
        st = self._load()
        tries = st.get("attempts") or {}
        st["attempts"] = {"seq": d.seq, "n": tries.get("n", 0) + 1 if tries.get("seq") == d.seq else 1}
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
        self.pending = None
        for f in self.dir.glob(f"{d.sha256}*"):
            shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)
        bundle.unlink(missing_ok=True)
        self._report()

    def _report(self, error: str = "") -> None:
        cur, st = self.agent.current, self._load()
        doc = {"v": 1, "type": "reported", "device": self.device, "group": self.group,
               "model": cur.manifest.name if cur else None, "version": cur.manifest.version if cur else None,
               "installed_sha256": st.get("installed_sha256"), "seq": st.get("seq", 0), "status": self.status,
               "error": error or self.error, "transfer": self.transfer, "delta": delta.available(),
               "t": time.time()}
        self.client.publish(device_topic(self.fleet, self.device, "reported"), json.dumps(doc), qos=1, retain=True)
