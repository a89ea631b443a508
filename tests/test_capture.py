"""Prediction capture end to end on a real Mosquitto: an agent process captures by each policy, field
labels give live accuracy in fleet status, the export is build data with its provenance signed into the
manifest (and no captured sample in the bundle), purge; the queue survives a broker outage and a restart
with exact drop counts and keeps the daily budget; nothing of it exists when capture is off."""

from __future__ import annotations

import http.client
import json
import re
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

from agent.capture.policy import CaptureConfig
from agent.capture.recorder import Capture
from agent.fleet.mqtt import Broker
from agent.serve.service import Agent
from conftest import DEVICE_ARCH, DEVICE_PROFILE
from fleethelp import Watcher, agent_process, needs_mosquitto, wait_for
from toolkit.fleet.collector import Collector, open_db
from toolkit.fleet.publish import publish

pytestmark = needs_mosquitto
LOW = 0.99  # top-1 probability below this is captured as low-confidence


def _call(port: int, method: str, path: str, doc=None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, None if doc is None else json.dumps(doc), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _infer(port: int, x: np.ndarray, rid: str | None = None) -> tuple[str | None, np.ndarray]:
    doc = {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    if rid is not None:
        doc["id"] = rid
    status, out = _call(port, "POST", "/v2/models/digits/infer", doc)
    assert status == 200, out
    o = out["outputs"][0]
    return out.get("id"), np.asarray(o["data"], np.float32).reshape(o["shape"])


def _port(log, proc, timeout=60.0) -> int:
    end = time.time() + timeout
    while time.time() < end:
        m = re.search(r"serving .* on http://[^:]+:(\d+)", log.read_text(errors="replace") if log.exists() else "")
        if m:
            return int(m.group(1))
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)
    raise AssertionError(log.read_text()[-3000:])


def _q(db_path, sql, *args):
    db = open_db(db_path)
    try:
        return [tuple(r) for r in db.execute(sql, args)]
    finally:
        db.close()


@pytest.fixture(scope="module")
def val(digits):
    with np.load(digits["validation"]) as v:
        return v["image"].astype(np.float32), v["y"]


def test_policies_labels_live_accuracy_export_build_and_purge(tmp_path, broker, settings, signing_key, fleet_bundles,
                                                                make_options, val):
    from toolkit.capture.request import send_request
    from toolkit.cli import cli
    from toolkit.fleet.views import versions

    x, y = val
    db = tmp_path / "fleet.db"
    col = Collector(Broker.parse(broker.url), "test", db).start()
    w = Watcher(broker)
    proc = agent_process(tmp_path, broker, settings.keyring_path, "cap-1", mqtt_extra=(
        f"[capture]\nenabled = true\nlow_confidence = {LOW}\ndrift_psi = 1000\n[telemetry]\ninterval = 0.5\n"))
    try:
        port = _port(tmp_path / "cap-1.log", proc)
        publish(fleet_bundles["v1"], Broker.parse(broker.url), "test", signing_key, device="cap-1")
        assert w.wait(lambda r: r.get("cap-1", {}).get("version") == 1), w.reports
        status, info = _call(port, "GET", "/v2")
        assert "feedback" in info["extensions"]

        ids, preds, low = [], [], set()
        for i in range(60):  # half with the client's id, half with the one the agent generates
            rid, p = _infer(port, x[i:i + 1], f"client-{i}" if i % 2 else None)
            assert rid and (rid == f"client-{i}" if i % 2 else len(rid) == 16)
            ids.append(rid)
            preds.append(int(p.argmax()))
            if p.max() < LOW:
                low.add(rid)
        for k in range(2):  # far outside the calibration data's range: drift
            _infer(port, np.full((1, 8, 8, 1), 50.0 + k, np.float32), f"drift-{k}")
        assert 0 < len(low) < 60, "the threshold must split the digits for this test to mean anything"

        for rid, label in zip(ids, y[:60]):
            status, out = _call(port, "POST", "/v2/models/digits/feedback", {"id": rid, "label": int(label)})
            assert status == 200, out
        for doc, code in [({"id": "nope", "label": 1}, 404), ({"id": ids[0], "label": 10}, 400),
                          ({"id": ids[0], "labels": [1, 2]}, 400), ({"id": ids[0], "label": True}, 400),
                          ({"id": ids[0]}, 400), ({"label": 1}, 400)]:
            status, out = _call(port, "POST", "/v2/models/digits/feedback", doc)
            assert status == code and out["error"], (doc, status, out)
        assert _call(port, "POST", "/v2/models/other/feedback", {"id": ids[0], "label": 1})[0] == 404

        send_request(Broker.parse(broker.url), "test", signing_key, 1, device="cap-1")
        n = [0]

        def requested() -> bool:  # every request is captured once the device applied the request
            n[0] += 1
            _infer(port, x[n[0]:n[0] + 1], f"req-{n[0]}")
            return bool(_q(db, "SELECT 1 FROM captures WHERE reasons LIKE '%requested%'"))

        assert wait_for(requested, 30, poll=0.2)
        assert wait_for(lambda: len(_q(db, "SELECT 1 FROM labels")) == 60 and {r[0] for r in _q(
            db, "SELECT id FROM captures WHERE reasons LIKE '%low-confidence%' AND id NOT LIKE 'req-%'")} >= low, 30)
        by_reason = {rid: reasons for rid, reasons in _q(db, "SELECT id, reasons FROM captures")}
        assert {r for r, why in by_reason.items() if "low-confidence" in why
                and not r.startswith(("req-", "drift-"))} == low
        assert {r for r, why in by_reason.items() if "drift" in why} == {"drift-0", "drift-1"}
        assert not {r for r in ids if r not in low} & set(by_reason)  # confident answers were not captured

        acc = float(np.mean(np.asarray(preds) == y[:60]))
        db_ = open_db(db)
        try:
            (v1,) = [r for r in versions(db_, 600) if r["version"] == 1]
        finally:
            db_.close()
        assert v1["labelled"] == 60 and v1["accuracy"] == pytest.approx(acc)
        assert v1["captured"] == len(by_reason) and sum(v1["confidence"]) > 0 and sum(v1["classes"]) > 0
        res = CliRunner().invoke(cli, ["--home", str(tmp_path), "fleet", "status", "--db", str(db), "--window", "600"])
        assert res.exit_code == 0 and "live acc" in res.output and f"{acc:.3f}" in res.output, res.output

        res = CliRunner().invoke(cli, ["--home", str(tmp_path), "capture", "list", "--db", str(db)])
        assert res.exit_code == 0 and "cap-1" in res.output and "low-confidence" in res.output, res.output
        out = tmp_path / "field.npz"
        res = CliRunner().invoke(cli, ["--home", str(tmp_path), "capture", "export", "--db", str(db), "-o", str(out),
                                       "--labelled", "--version", "1"])
        assert res.exit_code == 0, res.output
        with np.load(out) as f:
            got_x, got_y = f["image"], f["y"]
        labelled = [i for i, r in enumerate(ids) if r in low]
        assert sorted(map(tuple, got_x.reshape(len(got_x), -1))) == sorted(map(tuple, x[labelled].reshape(
            len(labelled), -1)))
        assert sorted(got_y) == sorted(y[labelled])
    finally:
        proc.terminate()
        proc.wait(30)
        col.stop()
        w.stop()
    _build_with_export(tmp_path, out, make_options, got_x)
    res = CliRunner().invoke(cli, ["--home", str(tmp_path), "capture", "purge", "--db", str(db), "--device", "cap-1",
                                   "--yes"])
    assert res.exit_code == 0 and "deleted" in res.output, res.output
    assert _q(db, "SELECT COUNT(*) FROM captures") == [(0,)] and _q(db, "SELECT COUNT(*) FROM labels") == [(0,)]


def _build_with_export(tmp_path, export, make_options, captured: np.ndarray) -> None:
    """The export is accepted as validation data; its provenance is in the summary and the signed manifest;
    the bundle holds no captured sample (its golden set is made up from the reference statistics)."""
    import io
    import tarfile

    from agent.bundle import inspect_bundle
    from toolkit.build.pipeline import build

    res = build(make_options(tmp_path / "dist", [DEVICE_PROFILE], validation=export))
    bundle = res.profiles[0].bundle
    assert bundle is not None, res.table()
    prov = res.to_dict()["provenance"]["captured"]["validation"]
    assert prov["devices"] == ["cap-1"] and prov["versions"] == [1] and prov["samples"] == len(captured)
    manifest, _ = inspect_bundle(bundle)
    assert manifest["provenance"]["captured"]["validation"]["reasons"] == prov["reasons"]
    rows = {a.tobytes() for a in captured.astype(np.float32)}
    with tarfile.open(bundle) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read() if m.isfile() else b""
            if m.name.endswith(".npz"):
                with np.load(io.BytesIO(data)) as z:
                    for k in z.files:
                        a = z[k]
                        if k.startswith("in."):
                            assert not any(s.astype(np.float32).tobytes() in rows for s in a), k
            assert not any(r in data for r in list(rows)[:20]), m.name


def _settle(capture: Capture, n: int) -> bool:
    """The worker handled ``n`` captured requests (queued, dropped or over budget)."""
    return wait_for(lambda: len(capture.outbox) + capture.outbox.get("dropped") + capture.outbox.get("over_budget")
                    == n, 30)


@pytest.mark.device  # the agent's side: also in the emulated Pi userlands
def test_queue_survives_outage_and_restart_with_exact_drop_counts(tmp_path, broker, keyring, fleet_bundles, val):
    from agent.fleet.link import FleetLink

    x, _ = val
    db = tmp_path / "fleet.db"
    col = Collector(Broker.parse(broker.url), "test", db, client_id="cap-collector")
    col.client.reconnect_delay_set(1, 2)
    col.start()
    cfg = CaptureConfig(enabled=True, rate=1.0, queue_max=5)
    a = Agent(tmp_path / "q", keyring, DEVICE_ARCH)
    a.start()
    assert a.install(fleet_bundles["v1"]).ok
    a.capture = Capture(cfg, a.store.dir).start()
    link = FleetLink(a, keyring, Broker.parse(broker.url), "test", "cap-q", telemetry=None)
    link.start()
    try:
        for i in range(3):
            a.infer(x[i:i + 1], request_id=f"before-{i}")
        assert wait_for(lambda: len(_q(db, "SELECT 1 FROM captures WHERE device = 'cap-q'")) == 3)
        broker.stop()
        for i in range(20):
            a.infer(x[i:i + 1], request_id=f"outage-{i}")
        assert _settle(a.capture, 20)  # the first three were sent and acknowledged
        assert len(a.capture.outbox) == 5 and a.capture.outbox.get("dropped") == 15
        link.stop()
        a.capture.stop()  # the agent restarts while the broker is still down
        a.capture = Capture(cfg, a.store.dir).start()
        assert len(a.capture.outbox) == 5 and a.capture.outbox.get("dropped") == 15
        link = FleetLink(a, keyring, Broker.parse(broker.url), "test", "cap-q", telemetry=None)
        link.client.reconnect_delay_set(1, 2)
        link.start()
        broker.start()
        assert wait_for(lambda: len(_q(db, "SELECT 1 FROM captures WHERE device = 'cap-q'")) == 8, 60)
        kept = [r[0] for r in _q(db, "SELECT id FROM captures WHERE id LIKE 'outage-%' ORDER BY seq")]
        assert kept == [f"outage-{i}" for i in range(15, 20)]  # the newest five; the oldest were dropped
        assert _q(db, "SELECT dropped FROM capture_devices WHERE device = 'cap-q'") == [(15,)]
        assert len(a.capture.outbox) == 0
    finally:
        link.stop()
        a.capture.stop()
        col.stop()


@pytest.mark.device  # the agent's side: also in the emulated Pi userlands
def test_daily_budget_is_respected(tmp_path, keyring, fleet_bundles, val):
    x, _ = val
    a = Agent(tmp_path / "b", keyring, DEVICE_ARCH)
    a.start()
    assert a.install(fleet_bundles["v1"]).ok
    a.capture = Capture(CaptureConfig(enabled=True, rate=1.0, budget_bytes=2000), a.store.dir).start()
    try:
        for i in range(20):
            a.infer(x[i:i + 1], request_id=f"b-{i}")
        assert _settle(a.capture, 20)
        rows, _ = a.capture.outbox.peek_raw(100)
        used = sum(len(b) for _, _, b in rows)
        assert 0 < len(rows) < 20 and used <= 2000 < used + max(len(b) for _, _, b in rows)
        assert a.capture.outbox.get("over_budget") == 20 - len(rows) and a.capture.status()["budget_used"] == used
        from agent import status

        rep = status.report(a.store.dir, a)["capture"]  # what `edgeship-agent status` says
        assert (rep["queued"], rep["over_budget"], rep["budget_used"]) == (len(rows), 20 - len(rows), used)
    finally:
        a.capture.stop()


@pytest.mark.device  # the agent's side: also in the emulated Pi userlands
def test_no_capture_when_off(tmp_path, keyring, fleet_bundles, val):
    from agent.serve.http import make_server, serve_in_thread

    x, _ = val
    a = Agent(tmp_path / "off", keyring, DEVICE_ARCH)
    a.start()
    assert a.install(fleet_bundles["v1"]).ok
    server = make_server(a, port=0)
    serve_in_thread(server)
    port = server.server_address[1]
    try:
        rid, _ = _infer(port, x[:1])
        assert rid is None  # no id is made up when nothing can refer to it
        assert _infer(port, x[:1], "mine")[0] == "mine"
        assert "feedback" not in _call(port, "GET", "/v2")[1]["extensions"]
        status, out = _call(port, "POST", "/v2/models/digits/feedback", {"id": "mine", "label": 1})
        assert status == 404 and "[capture]" in out["error"]
        assert "edgeship-capture" not in {t.name for t in threading.enumerate()}
        assert not (a.store.dir / "capture.db").exists() and not (a.store.dir / "labels.db").exists()
    finally:
        server.shutdown()
        server.server_close()


def test_records_go_to_the_url_a_capture_request_gives(tmp_path, broker, keyring, signing_key, fleet_bundles, val):
    """A signed capture request with a URL: records are POSTed there (`edgeship capture receive`) instead of
    MQTT, checked and stored like the collector stores them; the receiver refuses what it cannot trust."""
    from agent.fleet.link import FleetLink
    from toolkit.capture.receive import Receiver
    from toolkit.capture.request import send_request

    x, _ = val
    rec = Receiver(tmp_path / "fleet.db", "test").start()
    a = Agent(tmp_path / "u", keyring, DEVICE_ARCH)
    a.start()
    assert a.install(fleet_bundles["v1"]).ok
    a.capture = Capture(CaptureConfig(enabled=True), a.store.dir).start()  # no sampling: only what the host asks
    link = FleetLink(a, keyring, Broker.parse(broker.url), "test", "cap-u", telemetry=None)
    link.start()
    try:
        a.infer(x[:1], request_id="before")
        send_request(Broker.parse(broker.url), "test", signing_key, 5, device="cap-u", url=rec.url)
        assert wait_for(lambda: a.capture.upload_url == rec.url, 30)
        for i in range(5):
            a.infer(x[i:i + 1], request_id=f"up-{i}")
        assert wait_for(lambda: len(_q(tmp_path / "fleet.db", "SELECT 1 FROM captures")) == 5, 30)
        assert sorted(r[0] for r in _q(tmp_path / "fleet.db", "SELECT id FROM captures WHERE device = 'cap-u' AND "
                                                                "reasons = 'requested'")) == [f"up-{i}" for i in range(5)]
        conn = http.client.HTTPConnection("127.0.0.1", rec.server.server_address[1], timeout=10)
        for headers, body, code in [({}, b"x", 400), ({"X-Edgeship-Device": "cap-u"}, b"junk", 422),
                                    ({"X-Edgeship-Device": "../etc"}, b"x", 400),
                                    ({"X-Edgeship-Device": "cap-u"}, b"x" * 300_000, 413)]:
            conn.request("POST", "/capture", body, headers)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == code, (headers, resp.status)
        assert rec.rejected == 1  # the junk body, recorded in the rejected table like a bad MQTT message
        # a restart keeps the open window; the old request, replayed (retained), is not applied again, and a
        # window that ended sends nothing more to its URL
        link.stop()
        until = a.capture.everything_until
        a.capture.everything_until, a.capture.upload_url = 0.0, ""
        link = FleetLink(a, keyring, Broker.parse(broker.url), "test", "cap-u", telemetry=None)
        assert (a.capture.everything_until, a.capture.upload_url) == (until, rec.url)
        a.capture.everything_until = 1.0  # as if it had ended long ago
        link.start()
        time.sleep(1.0)  # the retained request arrives again: same seq, ignored
        assert a.capture.everything_until == 1.0 and a.capture.upload_target() == ""
        assert a.capture.upload_target(now=1.0 + 60) == rec.url  # ...while draining after its window
    finally:
        link.stop()
        a.capture.stop()
        rec.stop()


@pytest.mark.device  # the agent's side: also in the emulated Pi userlands
def test_policy_decisions():
    """Each policy on its own, on known outputs (unit level: the decision the agent makes inline)."""
    from types import SimpleNamespace

    from agent.capture.policy import Decider, confidence

    spec = lambda n: SimpleNamespace(name=n)  # noqa: E731
    m = SimpleNamespace(inputs=[spec("x")], outputs=[spec("probs")],
                        data={"input_stats": [{"name": "x", "deciles": [0.0] + [0.5] * 9 + [1.0],
                                               "bins": {"edges": [0.25, 0.5, 0.75], "p": [0.25] * 4}}]})
    x_in, x_out = [np.array([[0.1, 0.3, 0.6, 0.9]], np.float32)], [np.full((1, 4), 3.0, np.float32)]
    sure, unsure = np.array([[0.9, 0.05, 0.05]], np.float32), np.array([[0.5, 0.45, 0.05]], np.float32)
    logits = np.array([[4.0, 0.0, -1.0]], np.float32)  # softmax: 0.976 top-1

    def why(cfg, out, arrays=x_in, everything=False):
        return Decider(cfg, m).reasons(arrays, confidence({"probs": out}, ["probs"]), everything)

    assert why(CaptureConfig(enabled=True, low_confidence=0.6), unsure) == ["low-confidence"]
    assert why(CaptureConfig(enabled=True, low_confidence=0.6), sure) == []
    assert why(CaptureConfig(enabled=True, low_confidence=0.95), logits) == []  # logits read through a softmax
    assert why(CaptureConfig(enabled=True, margin=0.1), unsure) == ["low-confidence"]
    assert why(CaptureConfig(enabled=True, margin=0.1), sure) == []
    assert why(CaptureConfig(enabled=True, drift_psi=5.0), sure, x_out) == ["drift"]  # outside the reference range
    assert why(CaptureConfig(enabled=True, drift_psi=5.0), sure) == []  # one value per reference bin: PSI ~0
    lumped = [np.full((1, 4), 0.3, np.float32)]  # in range, but all in one bin: PSI 6.9 against 4 even bins
    assert why(CaptureConfig(enabled=True, drift_psi=5.0), sure, lumped) == ["drift"]
    assert why(CaptureConfig(enabled=True), sure, everything=True) == ["requested"]
    d = Decider(CaptureConfig(enabled=True, rate=0.1), m)
    hits = sum(bool(d.reasons(x_in, None, False)) for _ in range(5000))
    assert 350 < hits < 650  # 500 expected; 6 standard deviations either side
    batch = np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25]], np.float32)  # one unsure row makes the request unsure
    c = confidence({"probs": batch}, ["probs"])
    assert c.top == (0, 0) and c.p1 == pytest.approx((0.9, 0.4)) and c.p2 == pytest.approx((0.05, 0.35))
    assert why(CaptureConfig(enabled=True, low_confidence=0.6), batch) == ["low-confidence"]


def test_an_upload_url_gets_the_device_certificate_and_trusts_the_fleet_ca(tmp_path, signing_key):
    """A receiver behind TLS that wants client certificates from the fleet CA (docs/protocol.md): the device
    trusts the fleet CA from its broker settings and presents its own certificate, so the receiver knows
    which device sends; without them the handshake fails and the records stay queued."""
    import ssl
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from agent.capture.recorder import upload
    from mosquitto import free_port
    from securityhelp import SecureHome

    sec = SecureHome(tmp_path, signing_key)
    dev = sec.enroll("pi-up", "g", "mqtts://localhost:8883")
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(dict(x[0] for x in self.connection.getpeercert()["subject"])["commonName"])
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    srv = HTTPServer(("127.0.0.1", free_port()), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sec.certs / "server.pem", sec.certs / "server.key")
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(sec.certs / "ca.pem")
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    (tmp_path / "state").mkdir()
    cap = Capture(CaptureConfig(enabled=True), tmp_path / "state")
    try:
        url = f"https://127.0.0.1:{srv.server_address[1]}/capture"
        assert upload(url, "test", "pi-up", [(1, b"x")], timeout=5) is None  # system CAs only: refused
        cap.attach(None, "test", "pi-up", Broker.parse("mqtts://localhost:8883", ca_file=str(dev / "ca.pem"),
                                                         cert_file=str(dev / "device.pem"),
                                                         key_file=str(dev / "device.key")))
        assert upload(url, "test", "pi-up", [(1, b"x"), (2, b"y")], cap._tls, timeout=5) == 2
        assert seen == ["pi-up", "pi-up"]
    finally:
        cap.outbox.close()
        cap.labels.close()
        srv.shutdown()
        srv.server_close()
