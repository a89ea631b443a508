"""The fleet protocol over MQTT (version 1): topics, and one builder and one parser per message type.

Owned by the agent (the device consumes and produces it); the host imports the same functions, so both
sides agree by construction. docs/protocol.md documents every field the builders emit
(tests/test_protocol.py checks it).

    message     builder          parser            sent by
    desired     desired_doc      parse_desired     host (signed with sign_message, retained)
    index       index_doc        parse_index       host (retained)
    reported    reported_doc     parse_reported    device (retained)
    presence    presence_doc     parse_presence    device (retained; the last will says offline)
    telemetry   telemetry_doc    parse_telemetry   device (through its outbox: telemetry_payload stamps seq)
    label       label_doc        parse_label       device (a field label, through its own outbox)
    capture_request  capture_request_doc  parse_capture_request  host (signed, retained)
    capture     capture_wire.pack  capture_wire.parse_capture  device (binary: captured predictions)
    keyring     keyring_doc      parse_keyring     host (signed by the root key with sign_message, retained)

Parsers trust nothing: sizes, types, ranges and list lengths are checked, and ProtocolError names the
topic and the field.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

from agent.errors import AgentError, ProtocolError
from agent.fleet.fields import Fields, is_sha
from agent.keys import Keyring, key_id
from agent.manifest import canonical_json

VERSION = 1
PREFIX = f"edgeship/v{VERSION}"
CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024
MAX_MESSAGE_BYTES = 256 * 1024
DEVICE_KINDS = ("desired", "reported", "presence", "telemetry", "capture", "label", "capture_request")
STATUSES = ("idle", "downloading", "installing", "installed", "failed", "rolled-back")
TRANSFER_MODES = ("full", "delta", "url")
MAX_TENSORS = 64  # inputs / outputs described in one telemetry record
MAX_CLASSES = 1000  # classes of a classifier output (as in the bundle's output_stats)
MAX_BINS = 64  # drift bins of one input


# ---------------------------------------------------------------- topics
def device_topic(fleet: str, device: str, kind: str) -> str:
    """kind: desired | reported | presence | telemetry"""
    return f"{PREFIX}/{fleet}/device/{device}/{kind}"


def group_topic(fleet: str, group: str, kind: str = "desired") -> str:
    """kind: desired | capture_request"""
    return f"{PREFIX}/{fleet}/group/{group}/{kind}"


def bundle_topic(fleet: str, sha256: str) -> str:
    """Prefix of a bundle's transfer topics: ``.../index`` and ``.../chunk/{i}``."""
    return f"{PREFIX}/{fleet}/bundle/{sha256}"


def keyring_topic(fleet: str) -> str:
    """The fleet's retained keyring document (the signing keys the root trusts, see agent.trust)."""
    return f"{PREFIX}/{fleet}/keyring"


def delta_topic(fleet: str, sha256: str, base_sha256: str) -> str:
    """Prefix of a delta's index and chunks: the bundle ``sha256`` as a patch against a model file."""
    return f"{PREFIX}/{fleet}/bundle/{sha256}/delta/{base_sha256}"


def parse_device_topic(fleet: str, topic: str, kinds: tuple[str, ...] = DEVICE_KINDS) -> tuple[str, str] | None:
    """(device, kind) when ``topic`` is ``edgeship/v1/{fleet}/device/{device}/{kind}`` with a kind in ``kinds``;
    None for anything else (some brokers, e.g. amqtt, deliver retained messages outside the subscribed filters)."""
    parts = topic.split("/")
    if (len(parts) != 6 or "/".join(parts[:2]) != PREFIX or parts[2] != fleet or parts[3] != "device"
            or not parts[4] or parts[5] not in kinds):
        return None
    return parts[4], parts[5]


# ---------------------------------------------------------------- envelope
def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


def sign_message(doc: dict[str, Any], key_id: str, sign: Callable[[bytes], bytes]) -> bytes:
    body = dict(doc, v=VERSION, key_id=key_id)
    body.pop("sig", None)
    body["sig"] = base64.b64encode(sign(canonical_json(body))).decode()
    return json.dumps(body, sort_keys=True).encode()


def parse_message(payload: bytes, topic: str, keyring: Keyring | None = None,
                  expect_type: str | None = None) -> dict[str, Any]:
    """Decode (and, with a keyring, verify) a JSON message; ProtocolError says what is wrong."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"{topic}: message of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        doc = json.loads(payload.decode("utf-8"))  # NaN/Infinity: each field's check names it
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
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
            signed = canonical_json(doc)
        except (ValueError, UnicodeError) as exc:  # e.g. a lone surrogate: nothing a key signed
            raise ProtocolError(f"{topic}: bad signature (the message cannot be canonicalized: {exc})") from exc
        try:
            keyring.verify(doc["key_id"], signed, raw, topic)
        except AgentError as exc:
            raise ProtocolError(str(exc)) from exc
    return doc



# ---------------------------------------------------------------- desired
@dataclass(frozen=True)
class Desired:
    """What the host wants a device (or group) to run."""

    model: str
    version: int
    sha256: str
    size: int
    seq: int
    target: str = ""
    url: str = ""
    rollback_to: int | None = None
    expires: float | None = None  # unix time after which the state is stale (None: a state from before expiry)

    @classmethod
    def from_doc(cls, doc: dict[str, Any], topic: str) -> "Desired":
        """From a verified desired-state document (a message, or the copy in the device's fleet state)."""
        f = Fields(doc, topic)
        target = f.str("target", "")
        if target and not target.startswith(("device:", "group:")):
            raise ProtocolError(f"{topic}: target must be device:ID or group:NAME, got {target!r:.60}")
        return cls(f.str("model"), f.int("version"), f.sha("bundle_sha256"), f.int("bundle_size", 1),
                   f.int("seq"), target, f.str("url", "", 2000), f.int("rollback_to", default=None),
                   f.num("expires", None, 0))


def desired_doc(model: str, version: int, sha256: str, size: int, target: str, url: str = "",
                rollback_to: int | None = None, ttl: float | None = None) -> dict[str, Any]:
    """A desired state for ``target`` (``device:ID`` or ``group:NAME``); sign it with sign_message.
    ``ttl``: seconds until it expires (the host refreshes it before; see refreshed)."""
    doc = {"type": "desired", "model": model, "version": version, "bundle_sha256": sha256, "bundle_size": size,
           "target": target, "seq": time.time_ns(), "url": url}
    if rollback_to is not None:
        doc["rollback_to"] = rollback_to
    if ttl is not None:
        doc["expires"] = round(time.time() + ttl, 3)
    return doc


def refreshed(doc: dict[str, Any], ttl: float) -> dict[str, Any]:
    """The same desired state (same seq: devices that handled it do not act again) with a later expiry;
    sign it with sign_message."""
    body = {k: v for k, v in doc.items() if k not in ("sig", "key_id", "v")}
    body["expires"] = round(time.time() + ttl, 3)
    return body


def parse_desired(payload: bytes, topic: str, keyring: Keyring) -> tuple[Desired, dict[str, Any]]:
    """A desired state signed by a key in ``keyring``, and its document (which the device keeps)."""
    doc = parse_message(payload, topic, keyring, expect_type="desired")
    return Desired.from_doc(doc, topic), doc


# ---------------------------------------------------------------- index
@dataclass(frozen=True)
class Patch:
    """What a delta index's patch rebuilds, and from which base."""

    target_sha256: str
    target_size: int
    base_sha256: str
    codec: str
    window_log: int


@dataclass(frozen=True)
class Index:
    sha256: str
    size: int
    chunk_size: int
    chunks: tuple[str, ...]
    deltas: tuple[str, ...] = ()
    delta: Patch | None = None


def index_doc(data: bytes, chunk_size: int = CHUNK_SIZE, deltas: list[str] | None = None,
              delta: Patch | None = None) -> dict[str, Any]:
    """The index of a bundle (``deltas``: the bases a patch exists for) or of a patch (``delta``)."""
    chunks = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)]
    doc: dict[str, Any] = {"v": VERSION, "type": "index", "sha256": hashlib.sha256(data).hexdigest(),
                           "size": len(data), "chunk_size": chunk_size,
                           "chunks": [hashlib.sha256(c).hexdigest() for c in chunks]}
    if deltas is not None:
        doc["deltas"] = sorted(deltas)
    if delta is not None:
        doc["delta"] = dict(delta.__dict__)
    return doc


def parse_index(payload: bytes, topic: str) -> Index:
    f = Fields(parse_message(payload, topic, expect_type="index"), topic)
    size, cs = f.int("size", 0), f.int("chunk_size", 1, MAX_CHUNK_SIZE)
    chunks = f.raw("chunks", [])
    if not isinstance(chunks, list) or len(chunks) != -(-size // cs) or not all(is_sha(c) for c in chunks):
        raise ProtocolError(f"{topic}: malformed chunk list (expected {-(-size // cs)} SHA-256 digests)")
    deltas = f.raw("deltas", [])
    if not isinstance(deltas, list) or len(deltas) > 64 or not all(is_sha(d) for d in deltas):
        raise ProtocolError(f"{topic}: deltas must be a list of SHA-256 digests")
    patch = None
    if (m := f.sub("delta")) is not None:
        patch = Patch(m.sha("target_sha256"), m.int("target_size", 1), m.sha("base_sha256"), m.str("codec"),
                      m.int("window_log", 10, 31))
    return Index(f.sha("sha256"), size, cs, tuple(chunks), tuple(deltas), patch)


# ---------------------------------------------------------------- reported
@dataclass(frozen=True)
class Reported:
    """A device's retained report: what it runs and where its update stands."""

    device: str
    group: str
    model: str | None
    version: int | None
    installed_sha256: str | None
    seq: int
    status: str
    error: str
    transfer: dict[str, Any]
    delta: bool
    t: float | None


def reported_doc(device: str, group: str, model: str | None, version: int | None, installed_sha256: str | None,
                 seq: int, status: str, error: str, transfer: dict[str, Any], delta: bool) -> dict[str, Any]:
    """``transfer``: how the last bundle arrived ({} or mode, bytes, bundle_bytes)."""
    return {"v": VERSION, "type": "reported", "device": device, "group": group, "model": model,
            "version": version, "installed_sha256": installed_sha256, "seq": seq, "status": status,
            "error": error, "transfer": transfer, "delta": delta, "t": time.time()}


def parse_reported(payload: bytes, topic: str, device: str) -> Reported:
    """``device``: the one the topic names (a report about another device is refused)."""
    f = Fields(parse_message(payload, topic, expect_type="reported"), topic)
    if f.str("device") != device:
        raise ProtocolError(f"{topic}: report names device {f.doc['device']!r:.60}")
    status = f.str("status")
    if status not in STATUSES:
        raise ProtocolError(f"{topic}: status must be one of {', '.join(STATUSES)}, got {status!r:.60}")
    transfer: dict[str, Any] = {}
    if (tr := f.sub("transfer")) is not None and tr.doc:
        mode = tr.str("mode")
        if mode not in TRANSFER_MODES:
            raise ProtocolError(f"{topic}: transfer.mode must be one of {', '.join(TRANSFER_MODES)}")
        transfer = {"mode": mode, "bytes": tr.int("bytes"), "bundle_bytes": tr.int("bundle_bytes")}
    return Reported(device, f.str("group", ""), f.str("model", None), f.int("version", default=None),
                    f.sha("installed_sha256", None), f.int("seq", 0), status, f.text("error"), transfer,
                    f.bool("delta", False), f.num("t", None, 0))


# ---------------------------------------------------------------- presence
@dataclass(frozen=True)
class Presence:
    online: bool
    t: float | None
    heartbeat_s: float | None


def presence_doc(online: bool, heartbeat_s: float | None = None) -> dict[str, Any]:
    """Online (with the time and the heartbeat period), or offline (the last will: no time, it is set at
    connect and published by the broker later)."""
    if not online:
        return {"v": VERSION, "type": "presence", "online": False}
    return {"v": VERSION, "type": "presence", "online": True, "t": time.time(), "heartbeat_s": heartbeat_s or None}


def parse_presence(payload: bytes, topic: str) -> Presence:
    f = Fields(parse_message(payload, topic, expect_type="presence"), topic)
    return Presence(f.bool("online"), f.num("t", None, 0), f.num("heartbeat_s", None, 0, 1e9))


# ---------------------------------------------------------------- telemetry
@dataclass(frozen=True)
class Telemetry:
    """One telemetry record, checked. ``hist``: the latency histogram ({growth, min_ms, counts});
    ``drift``: per input bin counts with the reference fractions, per output predicted-class counts."""

    device: str
    seq: int
    dropped: int
    group: str
    t: float | None
    interval_s: float | None
    model: str | None
    version: int | None
    count: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    hist: dict[str, Any] | None
    drift: dict[str, Any] | None
    system: dict[str, float | None]
    update: dict[str, Any]


def telemetry_doc(device: str, group: str, interval_s: float, model: str | None, version: int | None,
                  inference: dict[str, Any], drift: dict[str, Any] | None, system: dict[str, Any],
                  update: dict[str, Any]) -> dict[str, Any]:
    """A record as the device queues it (``inference`` from Window.snapshot, ``drift`` from
    Drift.snapshot, ``system`` from System.snapshot); telemetry_payload adds seq and dropped."""
    return _finite({"v": VERSION, "type": "telemetry", "device": device, "group": group, "t": time.time(),
                    "interval_s": interval_s, "model": model, "version": version, "inference": inference,
                    "drift": drift, "system": system, "update": update})


def _finite(x: Any) -> Any:
    """NaN and infinities (e.g. a drift score of NaN inputs) become null: JSON has no place for them."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def telemetry_payload(record: dict[str, Any], seq: int, dropped: int) -> bytes:
    """The record as sent: the outbox's sequence number and drop count, never the record's own."""
    return encode({**record, "seq": seq, "dropped": dropped})


SYSTEM_FIELDS = ("cpu_percent", "rss_bytes", "cpu_temp_c", "disk_free_bytes", "uptime_s")


def parse_telemetry(payload: bytes, topic: str, device: str) -> Telemetry:
    f = Fields(parse_message(payload, topic, expect_type="telemetry"), topic)
    if f.str("device", device) != device:
        raise ProtocolError(f"{topic}: record names device {f.doc['device']!r:.60}")
    inf = f.sub("inference") or Fields({}, f"{topic}: inference")
    count = inf.int("count", 0, 2**53, 0)
    errors = inf.int("errors", 0, count, 0)
    hist = None
    if (h := inf.sub("hist")) is not None:
        hist = _histogram(h, count)
    sysd = f.sub("system") or Fields({}, f"{topic}: system")
    upd = f.sub("update") or Fields({}, f"{topic}: update")
    return Telemetry(device, f.int("seq", 1), f.int("dropped", 0, default=0), f.str("group", ""),
                     f.num("t", None, 0), f.num("interval_s", None, 0, 1e9), f.str("model", None),
                     f.int("version", default=None), count, errors, inf.num("p50_ms", None, 0),
                     inf.num("p95_ms", None, 0), inf.num("p99_ms", None, 0), hist, _drift(f.sub("drift")),
                     {k: sysd.num(k, None) for k in SYSTEM_FIELDS},
                     {"status": upd.str("status", ""), "error": upd.text("error")})


def _histogram(h: Fields, count: int) -> dict[str, Any]:
    growth, min_ms = h.num("growth", lo=1.0001, hi=10.0), h.num("min_ms", lo=1e-9, hi=1e6)
    raw = h.raw("counts", {})
    if type(raw) is not dict or len(raw) > 10_000:
        raise ProtocolError(f"{h.where}: counts must be an object of at most 10000 buckets")
    if raw and not ("".join(raw).isdigit() and max(map(len, raw)) <= 5 and set(map(type, raw.values())) == {int}
                    and min(raw.values()) > 0):  # (C-level checks: this runs for every record the host stores)
        raise ProtocolError(f"{h.where}: counts must map bucket numbers to positive counts")
    if sum(raw.values()) != count:
        raise ProtocolError(f"{h.where}: bucket counts add up to {sum(raw.values())}, not count {count}")
    return {"growth": growth, "min_ms": min_ms, "counts": raw}  # {"bucket": count}, as sent


def _drift(d: Fields | None) -> dict[str, Any] | None:
    if d is None:
        return None
    inputs = []
    for x in d.items("inputs", MAX_TENSORS):
        counts, ref = x.ints("counts", MAX_BINS, None), x.nums("ref_p", MAX_BINS, None)
        if counts is not None and ref is not None and len(counts) != len(ref):
            raise ProtocolError(f"{x.where}: counts and ref_p differ in length")
        inputs.append({"name": x.str("name"), "psi": x.num("psi", None, lo=0), "counts": counts, "ref_p": ref,
                       "mean_shift_std": x.num("mean_shift_std", None)})
    outputs = [{"name": y.str("name"), "psi": y.num("psi", None, lo=0),
                "counts": y.ints("counts", MAX_CLASSES, None), "confidence": y.ints("confidence", 100, None)}
               for y in d.items("outputs", MAX_TENSORS)]
    return {"rows": d.int("rows", 0, 2**53, 0), "inputs": inputs, "outputs": outputs,
            "max_psi": d.num("max_psi", 0.0, lo=0), "flag": d.bool("flag", False),
            "threshold": d.num("threshold", None, lo=0)}


# ---------------------------------------------------------------- field labels
MAX_LABEL_ROWS = 1024  # samples of one labelled request


@dataclass(frozen=True)
class Label:
    """A ground-truth label for a request the device answered, with what it predicted then."""

    device: str
    seq: int
    dropped: int
    id: str
    model: str
    version: int
    t: float
    labels: tuple[int, ...]
    predicted: tuple[int, ...]
    confidence: tuple[float, ...]
    captured: bool


def label_doc(device: str, request_id: str, model: str, version: int, t: float, labels: list[int],
              predicted: list[int], confidence: list[float], captured: bool) -> dict[str, Any]:
    """``t``: when the request was answered; one label, predicted class and top-1 probability per sample.
    Queued in the device's label outbox; telemetry_payload stamps seq and dropped."""
    return {"v": VERSION, "type": "label", "device": device, "id": request_id, "model": model, "version": version,
            "t": t, "labels": labels, "predicted": predicted, "confidence": [round(c, 4) for c in confidence],
            "captured": captured}


def parse_label(payload: bytes, topic: str, device: str) -> Label:
    f = Fields(parse_message(payload, topic, expect_type="label"), topic)
    if f.str("device") != device:
        raise ProtocolError(f"{topic}: label names device {f.doc['device']!r:.60}")
    labels, predicted = f.ints("labels", MAX_LABEL_ROWS), f.ints("predicted", MAX_LABEL_ROWS)
    conf = f.nums("confidence", MAX_LABEL_ROWS)
    if not labels or len(labels) != len(predicted) or len(conf) != len(labels) or not all(0 <= c <= 1 for c in conf):
        raise ProtocolError(f"{topic}: labels, predicted and confidence (in [0, 1]) need one entry per sample")
    return Label(device, f.int("seq", 1), f.int("dropped", 0, default=0), f.str("id"), f.str("model"),
                 f.int("version"), f.num("t", lo=0), tuple(labels), tuple(predicted), tuple(conf),
                 f.bool("captured", False))


# ---------------------------------------------------------------- capture request
MAX_CAPTURE_MINUTES = 24 * 60


@dataclass(frozen=True)
class CaptureRequest:
    """Capture every request until ``until`` (host clock, seconds since the epoch); send captured records
    to ``url`` by HTTP(S) POST instead of MQTT ("": over MQTT)."""

    target: str
    seq: int
    until: float
    url: str = ""


def capture_request_doc(target: str, minutes: float, url: str = "") -> dict[str, Any]:
    """Ask ``target`` (``device:ID`` or ``group:NAME``) to capture everything for ``minutes`` from now (0:
    stop), and to upload captured records to ``url`` (empty: over MQTT); sign it with sign_message and retain
    it (a device that connects later still sees when it ends)."""
    now = time.time()
    return {"type": "capture_request", "target": target, "seq": time.time_ns(), "t": now, "minutes": minutes,
            "url": url}


def parse_capture_request(payload: bytes, topic: str, keyring: Keyring) -> CaptureRequest:
    f = Fields(parse_message(payload, topic, keyring, expect_type="capture_request"), topic)
    target = f.str("target")
    if not target.startswith(("device:", "group:")):
        raise ProtocolError(f"{topic}: target must be device:ID or group:NAME, got {target!r:.60}")
    url = f.str("url", "", 2000)
    if url and not url.startswith(("http://", "https://")):
        raise ProtocolError(f"{topic}: url must be an http:// or https:// URL, got {url!r:.60}")
    return CaptureRequest(target, f.int("seq"),
                          f.num("t", lo=0, hi=1e10) + 60 * f.num("minutes", lo=0, hi=MAX_CAPTURE_MINUTES), url)


# ---------------------------------------------------------------- keyring
MAX_KEYS = 64  # signing keys one keyring may trust
MAX_REVOKED = 1024


@dataclass(frozen=True)
class KeyringDoc:
    """The signing keys the fleet's root key trusts (by key id), as of ``version``, until ``expires``;
    ``revoked``: key ids the root withdrew (kept so devices can say why they refuse a signature)."""

    version: int
    expires: float
    keys: dict[str, bytes]
    revoked: tuple[str, ...]


def keyring_doc(version: int, keys: dict[str, bytes], expires: float, revoked: list[str] = ()) -> dict[str, Any]:
    """``keys``: {key id: raw Ed25519 public key}. Sign it with the ROOT key (sign_message)."""
    return {"type": "keyring", "version": version, "expires": round(expires, 3),
            "keys": [{"key_id": k, "public": base64.b64encode(raw).decode()} for k, raw in sorted(keys.items())],
            "revoked": sorted(set(revoked))}


def parse_keyring(payload: bytes, topic: str, root: Keyring) -> KeyringDoc:
    """A keyring document signed by the root key (``root``: a keyring holding only the root public key)."""
    f = Fields(parse_message(payload, topic, root, expect_type="keyring"), topic)
    keys: dict[str, bytes] = {}
    for k in f.items("keys", MAX_KEYS):
        try:
            raw = base64.b64decode(k.str("public"), validate=True)
        except ValueError as exc:
            raise ProtocolError(f"{k.where}: public is not base64") from exc
        if len(raw) != 32 or k.str("key_id") != key_id(raw):
            raise ProtocolError(f"{k.where}: not a 32-byte Ed25519 key matching its key_id")
        keys[key_id(raw)] = raw
    revoked = f.raw("revoked", [])
    if (not isinstance(revoked, list) or len(revoked) > MAX_REVOKED
            or not all(isinstance(r, str) and len(r) == 16 for r in revoked)):
        raise ProtocolError(f"{topic}: revoked must be a list of at most {MAX_REVOKED} key ids")
    if not keys or set(keys) & set(revoked):
        raise ProtocolError(f"{topic}: a keyring trusts at least one key and none it revokes")
    return KeyringDoc(f.int("version", 1), f.num("expires", lo=0), keys, tuple(revoked))
