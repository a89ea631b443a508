"""The fleet contract (agent/fleet/protocol.py): one builder and one parser per message type, checked
against each other, against hostile payloads and against docs/protocol.md; the outbox builds records."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from agent.errors import ProtocolError
from agent.fleet import protocol as P
from agent.fleet.outbox import Outbox
from agent.fleet.telemetry import Drift, System, Window

ROOT = Path(__file__).resolve().parent.parent
SHA = "ab" * 32
KEY = bytes(range(32))  # a public key's 32 bytes


def _drift_snapshot() -> dict:
    """A real Drift over a manifest-shaped object: one input with reference bins, one 3-class output."""
    manifest = SimpleNamespace(
        data={"input_stats": [{"name": "x", "mean": 0.5, "std": 0.2, "bins": {"edges": [0.3, 0.7], "p": [0.3, 0.4, 0.3]}}],
              "output_stats": [{"name": "y", "p": [0.2, 0.5, 0.3]}]},
        inputs=[SimpleNamespace(name="x")], outputs=[SimpleNamespace(name="y")])
    d = Drift(manifest)
    rng = np.random.default_rng(0)
    for _ in range(60):
        x = rng.random((1, 4)).astype(np.float32)
        d.observe([x], {"y": rng.random((1, 3))})
    snap = d.snapshot()
    assert snap is not None
    return snap


def _samples(tmp_path) -> dict[str, bytes]:
    """One message of every type, made by the builders as the device and the host make them."""
    w = Window()
    for ms in (0.2, 0.4, 3.0, 250.0):
        w.observe(ms, ms < 100)
    record = P.telemetry_doc("pi-1", "kitchen", 10.0, "digits", 2, w.snapshot(), _drift_snapshot(),
                             System(tmp_path).snapshot(), {"status": "installed", "error": ""})
    desired = P.desired_doc("digits", 2, SHA, 1234, "device:pi-1", "https://cdn/x.bundle", rollback_to=1, ttl=60)
    keyring = P.keyring_doc(3, {P.key_id(KEY): KEY}, 2e9, ["cd" * 8])
    return {
        "desired": P.sign_message(desired, "k1", lambda b: b"sig"),
        "keyring": P.sign_message(keyring, "root", lambda b: b"sig"),
        "index": P.encode(P.index_doc(b"x" * 100, 64, deltas=[SHA])),
        "delta-index": P.encode(P.index_doc(b"p" * 10, 64, delta=P.Patch(SHA, 100, SHA, "zstd", 22))),
        "reported": P.encode(P.reported_doc("pi-1", "kitchen", "digits", 2, SHA, 7, "installed", "",
                                            {"mode": "delta", "bytes": 10, "bundle_bytes": 100}, True)),
        "presence": P.encode(P.presence_doc(True, 30.0)),
        "offline": P.encode(P.presence_doc(False)),
        "telemetry": P.telemetry_payload(record, 42, 3),
        "label": P.telemetry_payload(P.label_doc("pi-1", "r-1", "digits", 2, 1.5, [3, 1], [3, 7], [0.9, 0.4], True),
                                     5, 0),
        "capture_request": P.sign_message(P.capture_request_doc("device:pi-1", 10), "k1", lambda b: b"sig"),
        "capture-header": _capture_header(),
        "capture-record": _capture_meta(),
    }


def _capture_message() -> bytes:
    import numpy as np

    from agent.fleet.capture_wire import encode_record, pack

    blob = encode_record({"id": "r-1", "model": "digits", "version": 2, "t": 1.5, "reasons": ["rate"],
                          "layout": "batch"}, [("image", np.ones((1, 8, 8, 1), np.float32))],
                         [("probs", np.full((1, 10), 0.1, np.float32))])
    big = encode_record({"id": "r-2", "model": "digits", "version": 2, "t": 1.5, "reasons": ["requested"],
                         "layout": "batch"}, [("image", np.random.default_rng(0).random((1, 300, 300), np.float32))], [])
    return [m for _, m in pack("pi-1", [(1, blob), (2, big)], 4, 2)]


def _capture_header() -> bytes:
    """The JSON headers of capture messages (whole records and a part), for the documentation check."""
    from agent.fleet.capture_wire import MAGIC

    heads = [m[len(MAGIC):m.index(b"\n", len(MAGIC))] for m in _capture_message()]
    return json.dumps([json.loads(h) for h in heads]).encode()


def _capture_meta() -> bytes:
    import struct
    import zlib

    from agent.fleet.capture_wire import parse_capture

    blob = parse_capture(_capture_message()[0], "t", "pi-1").records[0][1]
    raw = zlib.decompress(blob)
    return raw[4:4 + struct.unpack("<I", raw[:4])[0]]


def _keys(doc, out: set[str]) -> set[str]:
    if isinstance(doc, dict):
        for k, v in doc.items():
            if not k.isdigit():  # histogram buckets are data, not fields
                out.add(k)
            _keys(v, out)
    elif isinstance(doc, list):
        for v in doc:
            _keys(v, out)
    return out


def test_every_field_the_builders_emit_is_documented(tmp_path):
    doc = (ROOT / "docs" / "protocol.md").read_text()
    documented = set(re.findall(r"`([a-z_0-9]+)`", doc))
    emitted: set[str] = set()
    for payload in _samples(tmp_path).values():
        _keys(json.loads(payload), emitted)
    assert emitted - documented == set(), f"fields sent but not in docs/protocol.md: {sorted(emitted - documented)}"
    assert f"edgeship/v{P.VERSION}/" in doc and all(f"`{s}`" in doc for s in P.STATUSES)


def test_builders_and_parsers_agree(tmp_path):
    s = _samples(tmp_path)
    d, _ = P.parse_desired(s["desired"], "t", _Trusting())
    assert (d.model, d.version, d.sha256, d.size, d.target, d.url, d.rollback_to) == (
        "digits", 2, SHA, 1234, "device:pi-1", "https://cdn/x.bundle", 1) and d.expires > 1e9
    k = P.parse_keyring(s["keyring"], "t", _Trusting())
    assert (k.version, k.expires, k.keys, k.revoked) == (3, 2e9, {P.key_id(KEY): KEY}, ("cd" * 8,))
    idx = P.parse_index(s["index"], "t")
    assert idx.size == 100 and idx.chunk_size == 64 and len(idx.chunks) == 2 and idx.deltas == (SHA,)
    assert P.parse_index(s["delta-index"], "t").delta == P.Patch(SHA, 100, SHA, "zstd", 22)
    r = P.parse_reported(s["reported"], "t", "pi-1")
    assert (r.status, r.version, r.transfer["mode"], r.delta, r.seq) == ("installed", 2, "delta", True, 7)
    assert P.parse_presence(s["presence"], "t").heartbeat_s == 30.0
    off = P.parse_presence(s["offline"], "t")
    assert off.online is False and off.t is None
    t = P.parse_telemetry(s["telemetry"], "t", "pi-1")
    assert (t.seq, t.dropped, t.count, t.errors, t.model, t.version) == (42, 3, 4, 1, "digits", 2)
    assert sum(t.hist["counts"].values()) == 4 and t.p95_ms == pytest.approx(250, rel=0.08)
    assert t.drift["inputs"][0]["counts"] and len(t.drift["inputs"][0]["ref_p"]) == 3
    assert sum(t.drift["outputs"][0]["counts"]) == 60
    lb = P.parse_label(s["label"], "t", "pi-1")
    assert (lb.seq, lb.id, lb.version, lb.labels, lb.predicted, lb.captured) == (5, "r-1", 2, (3, 1), (3, 7), True)
    cr = P.parse_capture_request(s["capture_request"], "t", _Trusting())
    assert cr.target == "device:pi-1" and cr.until == pytest.approx(json.loads(s["capture_request"])["t"] + 600)
    from agent.fleet.capture_wire import decode_record, parse_capture

    msgs = [parse_capture(m, "t", "pi-1") for m in _capture_message()]
    rec = decode_record(msgs[0].records[0][1], "t")
    assert (rec.id, rec.reasons, rec.inputs["image"].shape, msgs[0].dropped, msgs[0].over_budget) == (
        "r-1", ("rate",), (1, 8, 8, 1), 4, 2)
    parts = [m.part for m in msgs if m.part]
    assert len(parts) == parts[0][2] > 1
    joined = b"".join(p[4] for p in sorted(parts, key=lambda p: p[1]))
    assert decode_record(joined, "t").inputs["image"].shape == (1, 300, 300)


def _capture(head: dict, body: bytes = b"") -> bytes:
    from agent.fleet.capture_wire import MAGIC

    return MAGIC + json.dumps({"v": 1, "type": "capture", "device": "d", **head}).encode() + b"\n" + body


def _record(meta: dict, data: bytes) -> bytes:
    import struct
    import zlib

    head = json.dumps({"id": "r", "model": "m", "version": 1, "t": 1.0, "reasons": [], "layout": "batch",
                       **meta}).encode()
    return zlib.compress(struct.pack("<I", len(head)) + head + data)


@pytest.mark.parametrize("payload, field", [
    (b"GIF89a", "not an edgeship capture"),
    (_capture({"device": "e"}), "names device"),
    (_capture({"records": [{"seq": 1, "size": 10}]}, b"abc"), "runs past"),
    (_capture({"records": [{"seq": 1, "size": 3}]}, b"abcdef"), "after the records"),
    (_capture({"records": [{"seq": 0, "size": 3}]}, b"abc"), "seq"),
    (_capture({"records": [{"seq": 1, "size": 3}] * 1001}, b"abc"), "records"),
    (_capture({"part": {"seq": 1, "index": 5, "count": 2, "size": 9}}, b"abc"), "index"),
    (_capture({}) + b" " * 300_000, "exceeds"),
])
def test_capture_messages_from_outside_are_checked(payload, field):
    from agent.fleet.capture_wire import parse_capture

    with pytest.raises(P.ProtocolError, match=field):
        parse_capture(payload, "t", "d")


@pytest.mark.parametrize("blob, field", [
    (_record({"tensors": [{"name": "x", "role": "input", "dtype": "float32", "shape": [1, 4]}]}, b"\0" * 8),
     "other than the 16 bytes"),
    (_record({"tensors": [{"name": "x", "role": "input", "dtype": "float32", "shape": [1 << 20, 1 << 20]}]}, b""),
     "exceed"),  # a shape claiming terabytes is refused before anything is inflated
    (_record({"tensors": [{"name": "x", "role": "input", "dtype": "float32", "shape": [4]}]}, b"\0" * (100 << 20)),
     "other than the 16 bytes"),  # a zlib bomb stops at what the shapes say
    (_record({"tensors": [{"name": "x", "role": "input", "dtype": "object", "shape": [1]}]}, b"\0"), "dtype"),
    (_record({"reasons": "x" * 100}, b""), "reasons"),
    (b"not zlib", "zlib"),
])
def test_captured_records_from_outside_are_checked(blob, field):
    from agent.fleet.capture_wire import decode_record

    with pytest.raises(P.ProtocolError, match=field):
        decode_record(blob, "t")


class _Trusting:
    def verify(self, *a):
        pass


def _tele(**over) -> bytes:
    doc = {"v": 1, "type": "telemetry", "seq": 1, "device": "d", "inference": {"count": 2, "errors": 0}}
    for k, v in over.items():
        doc[k] = v
    return json.dumps(doc).encode()


HOSTILE = [
    ("telemetry", _tele(seq="x"), "seq"),
    ("telemetry", _tele(seq=0), "seq"),
    ("telemetry", _tele(seq=10**30), "seq"),
    ("telemetry", _tele(inference={"count": "many"}), "count"),
    ("telemetry", _tele(inference={"count": 2, "errors": 3}), "errors"),
    ("telemetry", _tele(inference={"count": 2, "errors": 0, "hist": {"growth": 1.08, "min_ms": 0.001,
                                                                    "counts": {"5": 1}}}), "add up"),
    ("telemetry", _tele(inference={"count": 1, "errors": 0, "hist": {"growth": 1.08, "min_ms": 0.001,
                                                                    "counts": {"abc": 1}}}), "bucket"),
    ("telemetry", _tele(inference={"count": 1, "errors": 0, "p95_ms": float("nan")}), "p95_ms"),
    ("telemetry", _tele(drift={"inputs": [{"name": "x", "psi": 0.1}] * 100}), "inputs"),
    ("telemetry", _tele(drift={"outputs": [{"name": "y", "psi": 0.1, "counts": [1] * 5000}]}), "counts"),
    ("telemetry", _tele(system={"cpu_percent": "hot"}), "cpu_percent"),
    ("telemetry", _tele(model={"x": 1}), "model"),
    ("telemetry", _tele(device="someone-else"), "names device"),
    ("telemetry", b"[]", "not an edgeship"),
    ("telemetry", b"\xff\xfe", "not JSON"),
    ("telemetry", b"{" * 100_000, "not JSON"),
    ("telemetry", b" " * (P.MAX_MESSAGE_BYTES + 1), "exceeds"),
    ("reported", json.dumps({"v": 1, "type": "reported", "device": "d", "status": "exploded"}).encode(), "status"),
    ("reported", json.dumps({"v": 1, "type": "reported", "device": "e", "status": "idle"}).encode(), "names device"),
    ("reported", json.dumps({"v": 1, "type": "reported", "device": "d", "status": "idle", "version": "1"}).encode(),
     "version"),
    ("reported", json.dumps({"v": 1, "type": "reported", "device": "d", "status": "idle",
                             "transfer": {"mode": "pigeon", "bytes": 1, "bundle_bytes": 1}}).encode(), "mode"),
    ("presence", json.dumps({"v": 1, "type": "presence", "online": "yes"}).encode(), "online"),
    ("index", json.dumps({"v": 1, "type": "index", "sha256": SHA, "size": 10**12, "chunk_size": 65536,
                          "chunks": [SHA]}).encode(), "chunk list"),
    ("index", json.dumps({"v": 1, "type": "index", "sha256": SHA, "size": 10, "chunk_size": 0,
                          "chunks": [SHA]}).encode(), "chunk_size"),
    ("index", json.dumps({"v": 1, "type": "index", "sha256": SHA, "size": 10, "chunk_size": 64,
                          "chunks": ["zz"]}).encode(), "chunk list"),
    ("index", json.dumps({"v": 1, "type": "index", "sha256": SHA, "size": 10, "chunk_size": 64, "chunks": [SHA],
                          "delta": {"target_sha256": SHA, "target_size": 5, "base_sha256": SHA, "codec": "zstd",
                                    "window_log": 99}}).encode(), "window_log"),
]




def _keyring(**over) -> bytes:
    doc = {"v": 1, "type": "keyring", "version": 2, "expires": 2e9, "key_id": "root", "sig": "c2ln",
           "keys": [{"key_id": P.key_id(KEY), "public": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}]}
    return json.dumps({**doc, **over}).encode()


HOSTILE += [
    ("keyring", _keyring(keys=[{"key_id": "0" * 16, "public": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}]),
     "matching its key_id"),
    ("keyring", _keyring(keys=[{"key_id": "0" * 16, "public": "AAEC"}]), "32-byte"),
    ("keyring", _keyring(keys=[]), "at least one key"),
    ("keyring", _keyring(revoked=[P.key_id(KEY)]), "none it revokes"),
    ("keyring", _keyring(revoked=["x"] * 2000), "revoked"),
    ("keyring", _keyring(version=0), "version"),
    ("keyring", _keyring(keys=[{"key_id": "a", "public": "b"}] * 100), "keys"),
]


@pytest.mark.parametrize("kind,payload,field", HOSTILE, ids=[f"{k}-{f}-{i}" for i, (k, _, f) in enumerate(HOSTILE)])
def test_parsers_refuse_hostile_messages_naming_the_field(kind, payload, field):
    parse = {"keyring": lambda: P.parse_keyring(payload, "top/ic", _Trusting()),
             "telemetry": lambda: P.parse_telemetry(payload, "top/ic", "d"),
             "reported": lambda: P.parse_reported(payload, "top/ic", "d"),
             "presence": lambda: P.parse_presence(payload, "top/ic"),
             "index": lambda: P.parse_index(payload, "top/ic")}[kind]
    with pytest.raises(ProtocolError, match=field) as e:
        parse()
    assert str(e.value).startswith("top/ic")


def test_desired_state_with_a_bad_hash_size_or_target_is_refused():
    good = P.desired_doc("m", 1, SHA, 10, "device:d")
    for bad in ({"bundle_sha256": "abc"}, {"bundle_size": 0}, {"target": "elsewhere"}, {"version": -1}):
        with pytest.raises(ProtocolError):
            P.Desired.from_doc({**good, **bad}, "t")


def test_device_topics_of_other_fleets_and_kinds_are_not_ours():
    assert P.parse_device_topic("f", "edgeship/v1/f/device/pi-1/reported") == ("pi-1", "reported")
    for topic in ("edgeship/v1/g/device/pi-1/reported", "edgeship/v1/f/device/pi-1/reported/x",
                  "edgeship/v1/f/bundle/abc/index", "edgeship/v2/f/device/pi-1/reported",
                  "edgeship/v1/f/device//reported", "edgeship/v1/f/device/pi-1/shell"):
        assert P.parse_device_topic("f", topic) is None, topic
    assert P.parse_device_topic("f", "edgeship/v1/f/device/pi-1/desired", ("reported",)) is None


def test_outbox_stores_records_and_stamps_its_own_seq(tmp_path):
    """The sent message is built from the stored record: valid JSON for an empty record, and the outbox's
    sequence number wins over a record's own ``seq``."""
    box = Outbox(tmp_path / "q.db", max_records=3)
    try:
        box.put("t", {})
        box.put("t", {"seq": 999, "dropped": 77, "x": [1, 2]})
        rows, dropped = box.peek()
        sent = [json.loads(P.telemetry_payload(rec, seq, dropped)) for seq, _, rec in rows]
        assert sent == [{"seq": 1, "dropped": 0}, {"seq": 2, "dropped": 0, "x": [1, 2]}]
        for _ in range(3):
            box.put("t", {"n": 1})
        rows, dropped = box.peek()
        assert [s for s, _, _ in rows] == [3, 4, 5] and dropped == 2 and box.dropped == 2
        box.db.execute("UPDATE outbox SET payload = ? WHERE seq = 4", (b"not json",))  # a damaged row
        rows, _ = box.peek()
        assert [s for s, _, _ in rows] == [3, 5] and len(box) == 2
    finally:
        box.close()


def test_telemetry_with_non_finite_numbers_is_still_sent(tmp_path):
    """A NaN drift score (NaN inputs) becomes null instead of a record that can never be encoded."""
    rec = P.telemetry_doc("d", "", 1.0, "m", 1, {"count": 0, "errors": 0},
                          {"rows": 60, "inputs": [{"name": "x", "psi": float("nan"), "mean_shift_std": float("inf")}],
                           "outputs": [], "max_psi": 0.0, "flag": False, "threshold": 0.25}, {}, {})
    box = Outbox(tmp_path / "q.db")
    try:
        box.put("t", rec)
        (seq, _, stored), = box.peek()[0]
        doc = json.loads(P.telemetry_payload(stored, seq, 0))
        assert doc["drift"]["inputs"][0]["psi"] is None
    finally:
        box.close()
