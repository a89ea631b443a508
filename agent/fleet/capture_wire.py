"""Captured predictions on the wire (part of the fleet protocol, docs/protocol.md "Prediction capture").

A captured **record** is stored on the device (and travels) as one zlib-compressed blob of: the length of
its metadata (4 bytes, little-endian), the metadata (JSON), then the bytes of its tensors (inputs, then
outputs; each little-endian, row-major, in the order and with the dtype and shape the metadata lists).
Records are compressed once, when captured: the day's byte budget counts exactly what will be sent.

A **capture message** (topic ``.../device/{device}/capture``, QoS 1, not retained) is binary:
``MAGIC``, one line of JSON (the header: ``v``, ``type`` = ``capture``, ``device``, ``dropped``,
``over_budget``, ``records`` = [{``seq``, ``size``}], optional ``part``), then the blobs back to back.
It carries several whole records, or one ``part`` ({``seq``, ``index``, ``count``, ``size``}) of a record
too big for one message; the collector joins the parts. Messages stay within MAX_MESSAGE_BYTES (256 KiB,
below Mosquitto's ``message_size_limit`` of the shipped config). Everything from outside is checked before
anything is allocated: the header's sizes against the payload, the tensors' byte counts against the
record's limit, the decompressed size against what the shapes say.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.errors import ProtocolError
from agent.fleet.fields import Fields
from agent.fleet.protocol import MAX_MESSAGE_BYTES, MAX_TENSORS, VERSION

MAGIC = b"EDGESHIP-CAPTURE 1\n"
MAX_HEADER_BYTES = 64 * 1024
MAX_RECORDS = 1000  # records in one message
MAX_RECORD_BYTES = 64 << 20  # a record's tensors, uncompressed
MAX_PARTS = 1024  # parts of one record (so at most 256 MiB compressed)
DTYPES = ("bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16",
          "float32", "float64")
ROLES = ("input", "output")


@dataclass(frozen=True)
class Record:
    """One captured request, decoded."""

    id: str
    model: str
    version: int
    t: float
    reasons: tuple[str, ...]
    layout: str
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


def encode_record(meta: dict[str, Any], inputs: list[tuple[str, np.ndarray]],
                  outputs: list[tuple[str, np.ndarray]], level: int = 6) -> bytes:
    """``meta``: id, model, version, t, reasons, layout. The tensors are described in it here."""
    tensors, raw = [], []
    for role, named in (("input", inputs), ("output", outputs)):
        for name, a in named:
            a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
            tensors.append({"name": name, "role": role, "dtype": a.dtype.name, "shape": list(a.shape)})
            raw.append(a.tobytes())
    head = json.dumps({**meta, "tensors": tensors}, separators=(",", ":"), allow_nan=False).encode()
    return zlib.compress(struct.pack("<I", len(head)) + head + b"".join(raw), level)


def decode_record(blob: bytes, where: str) -> Record:
    d = zlib.decompressobj()
    try:
        n = d.decompress(blob, 4)
        if len(n) != 4 or not 0 < struct.unpack("<I", n)[0] <= MAX_HEADER_BYTES:
            raise ProtocolError(f"{where}: record metadata length missing or over {MAX_HEADER_BYTES} bytes")
        size = struct.unpack("<I", n)[0]
        head = d.decompress(d.unconsumed_tail, size)
        meta = json.loads(head.decode("utf-8"))
    except zlib.error as exc:
        raise ProtocolError(f"{where}: record is not zlib data ({exc})") from exc
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"{where}: record metadata is not JSON ({exc})") from exc
    f = Fields(meta, f"{where}: record")
    layout = f.str("layout")
    reasons = f.raw("reasons", [])
    if not isinstance(reasons, list) or len(reasons) > 8 or not all(isinstance(r, str) and len(r) <= 40
                                                                    for r in reasons):
        raise ProtocolError(f"{where}: record reasons must be a list of at most 8 short strings")
    reasons = tuple(reasons)
    specs, total = [], 0
    for t in f.items("tensors", 2 * MAX_TENSORS):
        dt, role = t.str("dtype"), t.str("role")
        if dt not in DTYPES or role not in ROLES:
            raise ProtocolError(f"{t.where}: dtype must be one of {', '.join(DTYPES)} and role input or output")
        shape = t.raw("shape", None)
        if (type(shape) is not list or len(shape) > 32
                or not all(type(d) is int and 0 <= d <= MAX_RECORD_BYTES for d in shape)):
            raise ProtocolError(f"{t.where}: shape must be a list of at most 32 non-negative integers")
        if math.prod(d for d in shape if d) > MAX_RECORD_BYTES:  # also when a 0 makes the product 0
            raise ProtocolError(f"{t.where}: shape {shape} exceeds {MAX_RECORD_BYTES} values")
        n = math.prod(shape) * np.dtype(dt).itemsize
        total += n
        if total > MAX_RECORD_BYTES:
            raise ProtocolError(f"{where}: record tensors exceed {MAX_RECORD_BYTES} bytes")
        specs.append((t.str("name"), role, np.dtype(dt).newbyteorder("<"), shape, n))
    try:
        raw = d.decompress(d.unconsumed_tail, total + 1)
    except zlib.error as exc:
        raise ProtocolError(f"{where}: record tensors are not zlib data ({exc})") from exc
    if len(raw) != total or d.unconsumed_tail or not d.eof:
        raise ProtocolError(f"{where}: record tensors hold other than the {total} bytes their shapes say")
    ins, outs, off = {}, {}, 0
    for name, role, dt, shape, n in specs:
        a = np.frombuffer(raw, dt, n // dt.itemsize if dt.itemsize else 0, off).reshape(shape)
        (ins if role == "input" else outs)[name] = a.astype(dt.newbyteorder("="))
        off += n
    return Record(f.str("id"), f.str("model"), f.int("version"), f.num("t", lo=0), reasons, layout, ins, outs)


# ---------------------------------------------------------------- messages
def pack(device: str, rows: list[tuple[int, bytes]], dropped: int, over_budget: int,
         limit: int = MAX_MESSAGE_BYTES) -> list[tuple[int, bytes]]:
    """Capture messages for queued ``rows`` [(seq, blob)] in order, as [(last seq fully sent, payload)]:
    several records per message while they fit, a record too big for one message in parts."""
    out: list[tuple[int, bytes]] = []
    batch: list[tuple[int, bytes]] = []
    room = limit - len(MAGIC) - 300  # the header's fixed fields

    def flush() -> None:
        if batch:
            recs = [{"seq": s, "size": len(b)} for s, b in batch]
            out.append((batch[-1][0], _message(device, dropped, over_budget, recs, b"".join(b for _, b in batch))))
            batch.clear()

    used = 0
    for seq, blob in rows:
        cost = len(blob) + 40  # its header entry
        if cost > room:
            flush()
            used = 0
            step = room - 100
            count = -(-len(blob) // step)
            for i in range(count):
                part = {"seq": seq, "index": i, "count": count, "size": len(blob)}
                piece = blob[i * step:(i + 1) * step]
                out.append((seq if i == count - 1 else seq - 1,
                            _message(device, dropped, over_budget, [], piece, part)))
            continue
        if used + cost > room:
            flush()
            used = 0
        batch.append((seq, blob))
        used += cost
    flush()
    return out


def _message(device: str, dropped: int, over_budget: int, records: list[dict[str, int]], body: bytes,
             part: dict[str, int] | None = None) -> bytes:
    head: dict[str, Any] = {"v": VERSION, "type": "capture", "device": device, "dropped": dropped,
                            "over_budget": over_budget, "records": records}
    if part is not None:
        head["part"] = part
    return MAGIC + json.dumps(head, separators=(",", ":")).encode() + b"\n" + body


@dataclass(frozen=True)
class Message:
    device: str
    dropped: int
    over_budget: int
    records: tuple[tuple[int, bytes], ...]  # (seq, blob) of whole records
    part: tuple[int, int, int, int, bytes] | None  # (seq, index, count, size, piece)


def parse_capture(payload: bytes, topic: str, device: str) -> Message:
    """A capture message from ``device`` (the one the topic names); blobs are decoded by decode_record."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"{topic}: message of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
    if not payload.startswith(MAGIC):
        raise ProtocolError(f"{topic}: not an edgeship capture message")
    nl = payload.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER_BYTES)
    if nl < 0:
        raise ProtocolError(f"{topic}: capture header longer than {MAX_HEADER_BYTES} bytes")
    try:
        head = json.loads(payload[len(MAGIC):nl].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"{topic}: capture header is not JSON ({exc})") from exc
    f = Fields(head, topic)
    if f.raw("v", None) != VERSION or f.raw("type", None) != "capture":
        raise ProtocolError(f"{topic}: not an edgeship v{VERSION} capture message")
    if f.str("device") != device:
        raise ProtocolError(f"{topic}: message names device {f.doc['device']!r:.60}")
    body = payload[nl + 1:]
    recs, off = [], 0
    for r in f.items("records", MAX_RECORDS):
        seq, size = r.int("seq", 1), r.int("size", 1, MAX_MESSAGE_BYTES)
        if off + size > len(body):
            raise ProtocolError(f"{r.where}: size {size} runs past the end of the message")
        recs.append((seq, body[off:off + size]))
        off += size
    part = None
    if (p := f.sub("part")) is not None:
        count = p.int("count", 1, MAX_PARTS)
        part = (p.int("seq", 1), p.int("index", 0, count - 1), count, p.int("size", 1, MAX_PARTS * MAX_MESSAGE_BYTES),
                body[off:])
        off = len(body)
        if recs:
            raise ProtocolError(f"{topic}: a message carries whole records or one part, not both")
    if off != len(body):
        raise ProtocolError(f"{topic}: {len(body) - off} bytes after the records the header lists")
    return Message(device, f.int("dropped", 0, default=0), f.int("over_budget", 0, default=0), tuple(recs), part)
