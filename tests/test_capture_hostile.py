"""Hostile input on the capture surfaces: the feedback endpoint, `capture receive`, the collector's parsers of
capture and label messages, and the signed capture requests and keyrings a device reads. Each is refused with
a message that says what and where, and the process keeps going."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import struct
import zlib

import numpy as np
import pytest

from agent.capture.policy import CaptureConfig
from agent.capture.recorder import Capture
from agent.errors import ProtocolError
from agent.fleet.capture_wire import MAGIC, encode_record, pack
from agent.fleet.mqtt import Broker, connect_blocking, make_client
from agent.fleet.protocol import capture_request_doc, parse_capture_request, sign_message
from agent.serve.http import make_server, serve_in_thread
from agent.serve.service import Agent
from fleethelp import needs_mosquitto, wait_for
from modelkit import make_bundle, onnx_model
from toolkit.capture import store
from toolkit.fleet.collector import Collector, open_db

BASE = {"id": "r", "model": "m", "version": 1, "t": 1.0, "reasons": ["rate"], "layout": "batch"}


def _rec(meta, raw=b""):
    head = json.dumps(meta).encode()
    return zlib.compress(struct.pack("<I", len(head)) + head + raw)


def _msg(blob, seq=1, device="d1"):
    h = {"v": 1, "type": "capture", "device": device, "dropped": 0, "over_budget": 0,
         "records": [{"seq": seq, "size": len(blob)}]}
    return MAGIC + json.dumps(h).encode() + b"\n" + blob


def _label(**kw):
    d = {"v": 1, "type": "label", "device": "d1", "seq": 1, "id": "a", "model": "m", "version": 1, "t": 1.0,
         "labels": [1], "predicted": [1], "confidence": [0.5], "captured": False, **kw}
    return json.dumps(d).encode()


BAD_REASONS = _msg(_rec({**BASE, "reasons": 5, "tensors": []}))
HUGE_CONFIDENCE = _label(confidence=[10 ** 400])


@pytest.mark.parametrize("kind,payload,says", [
    ("capture", BAD_REASONS, "reasons must be a list"),
    ("capture", _msg(_rec({**BASE, "reasons": True, "tensors": []})), "reasons must be a list"),
    ("capture", _msg(_rec({**BASE, "tensors": [{"name": "x", "role": "input", "dtype": "float32",
                                                "shape": [0] + [1 << 26] * 3}]})), "exceeds"),
    ("label", HUGE_CONFIDENCE, "confidence"),
    ("label", b'{"v":1,"type":"label","device":"d1","seq":1,"id":"a","model":"m","version":1,"t":1,"labels":[1],'
              b'"predicted":[1],"confidence":[NaN]}', "confidence"),
])
def test_host_parsers_refuse_with_a_protocol_error(kind, payload, says):
    with pytest.raises(ProtocolError, match=says):
        store.parse_rows(kind, "d1", f"edgeship/v1/f/device/d1/{kind}", payload, 1.0)


@needs_mosquitto
def test_the_collector_keeps_storing_after_a_malformed_message(tmp_path, broker):
    b = Broker.parse(broker.url)
    col = Collector(b, "f", tmp_path / "fleet.db").start()
    pub = make_client("hostile-pub", b)
    connect_blocking(pub, b)
    good = encode_record({**BASE, "id": "g1"}, [("x", np.zeros((1, 2), np.float32))], [])
    try:
        pub.publish("edgeship/v1/f/device/d1/capture", BAD_REASONS, qos=1).wait_for_publish(5)
        pub.publish("edgeship/v1/f/device/d1/label", HUGE_CONFIDENCE, qos=1).wait_for_publish(5)
        pub.publish("edgeship/v1/f/device/d1/capture", _msg(good, seq=2), qos=1).wait_for_publish(5)
        db = open_db(tmp_path / "fleet.db")
        assert wait_for(lambda: db.execute("SELECT COUNT(*) FROM captures").fetchone()[0] == 1, 20)
        assert db.execute("SELECT COUNT(*) FROM rejected").fetchone()[0] == 2
        db.close()
    finally:
        pub.disconnect()
        pub.loop_stop()
        col.stop()


@pytest.fixture()
def receiver(tmp_path):
    from toolkit.capture.receive import Receiver

    r = Receiver(tmp_path / "fleet.db", "f").start()
    yield r
    r.stop()


def _raw(port, request: bytes, shut=False) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(request)
        if shut:
            s.shutdown(socket.SHUT_WR)
        return s.recv(4096)
    finally:
        s.close()


def test_capture_receive_refuses_what_it_cannot_store(receiver):
    port = receiver.server.server_address[1]
    head = b"POST /capture HTTP/1.1\r\nHost: x\r\nX-Edgeship-Device: d1\r\n"
    assert _raw(port, head + b"Content-Length: \xb2\r\n\r\nab").startswith(b"HTTP/1.0 411")  # not an ASCII digit
    assert _raw(port, head + b"Content-Length: 1000\r\n\r\nab", shut=True).startswith(b"HTTP/1.0 400")  # short
    assert receiver.server.RequestHandlerClass.timeout  # a client that stops sending does not hold a thread
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("POST", "/capture", BAD_REASONS, {"X-Edgeship-Device": "d1"})
    r = c.getresponse()
    assert r.status == 422 and "reasons must be a list" in r.read().decode()  # final: the device moves on
    # a record sent in parts whose whole does not decode: rejected, not acknowledged as stored
    blob = _rec({**BASE, "tensors": [{"name": "x", "role": "input", "dtype": "uint8", "shape": [400_000]}]},
                np.random.default_rng(0).integers(0, 255, 399_999, np.uint8).tobytes())
    parts = pack("d1", [(1, blob)], 0, 0)
    assert len(parts) > 1
    status = []
    for _, p in parts:
        c.request("POST", "/capture", p, {"X-Edgeship-Device": "d1"})
        r = c.getresponse()
        r.read()
        status.append(r.status)
    c.close()
    assert status[:-1] == [204] * (len(parts) - 1) and status[-1] == 422, status
    assert receiver.rejected == 2 and receiver.db.execute("SELECT COUNT(*) FROM captures").fetchone()[0] == 0


def test_unsigned_or_impossible_signed_messages_are_protocol_errors(keyring, signing_key):
    sig = base64.b64encode(b"\0" * 64).decode().encode()
    for payload in (b'{"v":1,"type":"capture_request","target":"device:d1","seq":1,"t":NaN,"minutes":1,'
                    b'"key_id":"k","sig":"%s"}' % sig,
                    b'{"v":1,"type":"capture_request","target":"device:\\ud800","seq":1,"t":1,"minutes":1,'
                    b'"key_id":"k","sig":"%s"}' % sig):
        with pytest.raises(ProtocolError):
            parse_capture_request(payload, "t", keyring)
    doc = capture_request_doc("device:d1", 10)
    doc["t"] = 1e17  # signed, but its window would never end
    with pytest.raises(ProtocolError, match="t"):
        parse_capture_request(sign_message(doc, signing_key.key_id, signing_key.sign), "t", keyring)


@pytest.fixture(scope="module")
def classifier_agent(tmp_path_factory, keyring, signing_key):
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Softmax", ["h"], ["y"], axis=-1)]
    model = onnx_model(nodes, [("x", "float32", [-1, 4])], [("y", "float32", [-1, 3])], [w])
    x = {"x": np.ones((1, 4), np.float32)}
    d = tmp_path_factory.mktemp("fb")
    b1 = make_bundle(d / "v1.bundle", signing_key, model, x, name="tiny", version=1, labels=["cat", "dog", "bird"])
    b2 = make_bundle(d / "v2.bundle", signing_key, model, x, name="tiny", version=2, labels=["a", "b", "c"])
    a = Agent(d / "state", keyring, "x86_64")
    a.start()
    assert a.install(b1).ok
    a.capture = Capture(CaptureConfig(enabled=True, rate=1.0), a.store.dir).start()
    server = make_server(a, port=0)
    serve_in_thread(server)
    yield a, server.server_address[1], b2
    server.shutdown()
    server.server_close()
    a.capture.stop()


def _call(port, path, doc):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("POST", path, json.dumps(doc).encode(), {"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def test_feedback_belongs_to_the_version_that_answered_and_ids_are_bounded(classifier_agent):
    a, port, b2 = classifier_agent
    infer = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.5] * 4}]}
    st, out = _call(port, "/v2/models/tiny/infer", {**infer, "id": "x" * 129})
    assert st == 400 and "at most 128" in out["error"]  # echoed, remembered and captured: bounded
    st, out = _call(port, "/v2/models/tiny/infer", infer)
    rid = out["id"]
    assert a.install(b2).ok  # v2 serves now, with other label names
    st, out = _call(port, "/v2/models/tiny/versions/2/feedback", {"id": rid, "label": 1})
    assert st == 404 and "version 2" in out["error"]  # v1 answered it
    st, out = _call(port, "/v2/models/tiny/versions/1/feedback", {"id": rid, "label": "dog"})  # v1's names
    assert st == 200 and out["model_version"] == "1" and out["labels"] == [1], out
