"""Getting a desired bundle onto the device: content-addressed MQTT chunks (resumable: finished chunks
live on disk), a zstd patch against the running bundle when the index offers one, or an HTTP(S) URL with
Range resume. Every path ends in a file whose SHA-256 is the signed ``bundle_sha256``; the install engine
verifies it again.

Runs on the link's worker thread only (no locking); talks to the broker through the link's client.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

from agent.errors import DeltaError, ProtocolError
from agent.fleet import delta
from agent.fleet.protocol import Desired, Index, bundle_topic, delta_topic, parse_index
from agent.serve.service import Agent
from agent.store import atomic_write, sweep_temp

log = logging.getLogger(__name__)


class Transfer:
    """The transfer in progress (at most one). ``ready(d, bundle_path, info)`` is called when the bundle file
    is complete and hash-checked; ``info`` = {"mode": full|delta|url, "bytes": received, "bundle_bytes"}."""

    def __init__(self, agent: Agent, client: Any, fleet: str, folder: Path,
                 ready: Callable[[Desired, Path, dict[str, Any]], None]):
        self.agent, self.client, self.fleet, self.dir, self.ready = agent, client, fleet, folder, ready
        self.dir.mkdir(exist_ok=True)
        self.pending: dict[str, Any] | None = None
        self.rx_bytes = 0  # bundle bytes received for the current transfer (chunks + indexes)

    # ------------------------------------------------------------ control
    def begin(self, d: Desired) -> None:
        old = self.pending
        if old:  # a newer desired state replaces a transfer in progress
            self.client.unsubscribe([f"{old['prefix']}/index"]
                                    + [f"{old['prefix']}/chunk/{i}" for i in sorted(old.get("missing", ()))])
        self.prune(keep=d.sha256)  # superseded partial downloads go
        self.pending = {"desired": d, "index": None, "base": None, "no_delta": False,
                        "prefix": bundle_topic(self.fleet, d.sha256)}
        self.rx_bytes = 0

    def subscribe(self) -> None:
        """Ask for the pending transfer's index (again, after a reconnect)."""
        if self.pending:
            self.client.subscribe(f"{self.pending['prefix']}/index", qos=1)

    def done(self, d: Desired) -> None:
        """Forget the transfer and every file it left in the download folder."""
        self.pending = None
        self.prune(keep=None)

    def prune(self, keep: str | None) -> None:
        """Delete everything in the download folder except the files of bundle ``keep`` (its chunks,
        patch, partial or assembled file), and the temp files of interrupted chunk writes."""
        for f in self.dir.iterdir():
            if keep is None or not f.name.startswith(keep):
                shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)
            elif f.is_dir():
                sweep_temp(f)

    def count(self, topic: str, payload: bytes) -> None:
        if "/bundle/" in topic:
            self.rx_bytes += len(payload)  # counted on the worker, in order with begin's reset

    # ------------------------------------------------------------ MQTT chunks
    def on_index(self, topic: str, payload: bytes) -> None:
        p = self.pending
        if not p or not payload or topic != f"{p['prefix']}/index":
            return
        idx = parse_index(payload, topic)
        d: Desired = p["desired"]
        if p["base"]:
            meta = idx.delta
            if (meta is None or meta.target_sha256 != d.sha256 or meta.target_size != d.size
                    or meta.base_sha256 != p["base"] or meta.codec not in delta.CODECS):
                raise ProtocolError(f"{topic}: delta index does not match the desired bundle")
        elif idx.sha256 != d.sha256 or idx.size != d.size:
            raise ProtocolError(f"{topic}: index does not match the desired bundle")
        self.client.unsubscribe(topic)
        if not p["base"] and (base := self._delta_base(idx)):
            p["base"], p["prefix"] = base, delta_topic(self.fleet, d.sha256, base)
            log.info("bundle %s: fetching a delta against model %s", d.sha256[:12], base[:12])
            self.client.subscribe(f"{p['prefix']}/index", qos=1)
            return
        p["index"] = idx
        folder = self._folder()
        folder.mkdir(exist_ok=True)
        missing = [i for i, h in enumerate(idx.chunks) if not _have(folder, i, h)]
        p["missing"] = set(missing)
        if not missing:
            self._assemble()
            return
        self.client.subscribe([(f"{p['prefix']}/chunk/{i}", 1) for i in missing])

    def on_chunk(self, topic: str, payload: bytes) -> None:
        p = self.pending
        if not p or not p.get("index") or not topic.startswith(f"{p['prefix']}/chunk/"):
            return  # late duplicate, or a chunk of another transfer
        i = topic.rsplit("/", 1)[1]
        if not i.isdigit() or int(i) not in p["missing"]:
            return  # a duplicate of a chunk we already stored (or not a chunk of this bundle)
        i = int(i)
        if hashlib.sha256(payload).hexdigest() != p["index"].chunks[i]:
            log.warning("%s: chunk hash mismatch, waiting for a good copy", topic)
            return
        atomic_write(self._folder() / f"{i}.chunk", payload, durable=False)  # re-checked by hash on resume
        self.client.unsubscribe(topic)
        p["missing"].discard(i)
        if not p["missing"]:
            self._assemble()

    def _folder(self) -> Path:
        p = self.pending
        assert p is not None
        sha = p["desired"].sha256
        return self.dir / (f"{sha}.delta-{p['base']}" if p["base"] else sha)

    def _assemble(self) -> None:
        p = self.pending
        assert p is not None
        d: Desired = p["desired"]
        idx: Index = p["index"]
        folder = self._folder()
        bundle = self.dir / f"{d.sha256}.bundle"
        h = hashlib.sha256()
        with open(bundle if not p["base"] else folder / "patch", "wb") as out:  # streamed: no bundle-sized buffer
            for k in range(len(idx.chunks)):
                data = (folder / f"{k}.chunk").read_bytes()
                h.update(data)
                out.write(data)
        if h.hexdigest() != idx.sha256:
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
        self.ready(d, bundle, {"mode": mode, "bytes": self.rx_bytes, "bundle_bytes": d.size})

    # ------------------------------------------------------------ delta
    def _delta_base(self, idx: Index) -> str | None:
        """The hash of our patch base when the index offers a patch against it (and we can apply one)."""
        if (self.agent.current is None or self.pending is None or self.pending["no_delta"] or not delta.available()
                or not idx.deltas):
            return None
        sha = hashlib.sha256(self._base_content()).hexdigest()
        return sha if sha in idx.deltas else None

    def _base_content(self) -> bytes:
        cur = self.agent.current
        assert cur is not None
        folder = self.agent.store.slot(cur.slot)
        return delta.base_content(lambda p: (folder / p).read_bytes(), [f.path for f in cur.manifest.files])

    def _apply_delta(self, p: dict[str, Any], patch: Path, bundle: Path) -> None:
        d: Desired = p["desired"]
        if self.agent.current is None:
            raise DeltaError("no active bundle to apply the patch to")
        base = self._base_content()
        if hashlib.sha256(base).hexdigest() != p["base"]:
            raise DeltaError("the bundle the patch is based on is no longer active")
        meta = p["index"].delta
        if meta.codec == delta.SEALED_CODEC:  # an encrypted bundle: the patch is of its plaintext
            engine = self.agent.engine
            data = delta.apply_sealed_patch(base, patch.read_bytes(), d.sha256, d.size, meta.window_log,
                                            engine.keyring, engine.opener, engine.limits.max_manifest_bytes)
        else:
            data = delta.apply_patch(base, patch.read_bytes(), d.sha256, d.size, meta.window_log)
        atomic_write(bundle, data, durable=False)  # verified again by the install engine

    # ------------------------------------------------------------ HTTP(S)
    def download_url(self, d: Desired) -> str:
        """HTTP(S) transfer (object storage / CDN): resumable with Range, verified like MQTT chunks.
        Returns '' when the bundle was handed on, else why the download failed."""
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
            self.pending = None
            return f"download from {d.url} failed: {exc}"
        h = hashlib.sha256()
        with open(part, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != d.sha256:
            part.unlink(missing_ok=True)
            self.pending = None
            raise ProtocolError(f"{d.url}: downloaded file does not match bundle_sha256")
        bundle = self.dir / f"{d.sha256}.bundle"
        part.rename(bundle)
        self.ready(d, bundle, {"mode": "url", "bytes": d.size, "bundle_bytes": d.size})
        return ""


def _have(folder: Path, i: int, sha: str) -> bool:
    f = folder / f"{i}.chunk"
    return f.is_file() and hashlib.sha256(f.read_bytes()).hexdigest() == sha
