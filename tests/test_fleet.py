"""Fleet updates over a real Mosquitto broker: publish → agents download chunks → install → report."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest

from agent.fleet.mqtt import Broker, make_client
from agent.fleet.protocol import device_topic
from agent.serve.service import Agent
from fleethelp import Hand, LogWatch, Watcher, needs_mosquitto, start_agent, wait_for
from toolkit.fleet.publish import publish
from toolkit.fleet.rollout import Thresholds

pytestmark = needs_mosquitto


@pytest.mark.device
def test_publish_to_group_installs_on_every_agent(tmp_path, broker, keyring, signing_key, fleet_bundles):
    w = Watcher(broker)
    agents = [start_agent(tmp_path, f"pi-{i}", broker, keyring, group="kitchen") for i in range(3)]
    try:
        res = publish(fleet_bundles["v1"], Broker.parse(broker.url), "test", signing_key, group="kitchen")
        assert res["chunks"] >= 1 and res["target"] == "group:kitchen"
        assert w.wait(lambda r: all(r.get(f"pi-{i}", {}).get("version") == 1 and
                                    r[f"pi-{i}"]["status"] == "installed" for i in range(3))), w.reports
        for a, _ in agents:
            assert a.current.manifest.version == 1
        publish(fleet_bundles["v2"], Broker.parse(broker.url), "test", signing_key, device="pi-1")
        assert w.wait(lambda r: r.get("pi-1", {}).get("version") == 2), w.reports
        assert agents[0][0].current.manifest.version == 1 and agents[1][0].current.manifest.version == 2
        from click.testing import CliRunner

        from toolkit.cli import cli

        res = CliRunner().invoke(cli, ["--home", str(tmp_path / "h"), "fleet", "devices", "--broker", broker.url,
                                       "--fleet", "test", "--json"])
        rows = {r["device"]: r for r in json.loads(res.output)}
        assert rows["pi-1"]["version"] == 2 and rows["pi-0"]["version"] == 1 and rows["pi-2"]["online"]
        assert rows["pi-0"]["group"] == "kitchen"
        agents[2][1].stop()  # a clean stop publishes offline (a crash would trigger the last will)
        res = CliRunner().invoke(cli, ["--home", str(tmp_path / "h"), "fleet", "devices", "--broker", broker.url,
                                       "--fleet", "test", "--json"])
        assert {r["device"]: r for r in json.loads(res.output)}["pi-2"]["online"] is False
    finally:
        for _, link in agents:
            link.stop()
        w.stop()


@pytest.mark.device
def test_offline_device_converges_and_bad_messages_are_ignored(tmp_path, broker, keyring, signing_key,
                                                                fleet_bundles):
    publish(fleet_bundles["v2"], Broker.parse(broker.url), "test", signing_key, device="late")
    w = Watcher(broker)
    bad = make_client("evil", Broker.parse(broker.url))
    bad.connect("127.0.0.1", broker.port)
    bad.loop_start()
    a, link = start_agent(tmp_path, "late", broker, keyring)
    try:
        assert w.wait(lambda r: r.get("late", {}).get("version") == 2), w.reports
        for payload in (b"not json", b'{"v": 1, "type": "desired"}', b"\xff\xfe",
                        json.dumps({"v": 1, "type": "desired", "model": "digits", "version": 9,
                                    "bundle_sha256": "0" * 64, "bundle_size": 10, "seq": 1,
                                    "target": "device:late", "key_id": "x", "sig": "AAAA"}).encode()):
            bad.publish(device_topic("test", "late", "desired"), payload, qos=1).wait_for_publish(5)
        assert w.wait(lambda r: "unsigned" in r["late"].get("error", "") or "does not trust" in
                      r["late"].get("error", "") or "not JSON" in r["late"].get("error", ""), 20), w.reports
        assert a.current.manifest.version == 2 and link._worker.is_alive()
    finally:
        link.stop()
        bad.loop_stop()
        w.stop()


@pytest.mark.device
def test_tampered_chunk_is_ignored_and_transfer_resumes(tmp_path, broker, keyring, signing_key, fleet_bundles):
    """A corrupted retained chunk is refused; after an agent restart mid-transfer and the publisher's repair,
    the agent fetches only what it lacked (the index and chunk 0), not the chunks it already had."""
    data = fleet_bundles["v2"].read_bytes()
    host = Hand(broker, "host-t", data, signing_key, 4096)
    host.index()
    host.chunks(range(host.n))
    host.c.publish(f"{host.prefix}/chunk/0", b"tampered", qos=1, retain=True).wait_for_publish(5)
    host.desire("pi-t")
    w = Watcher(broker)
    log = LogWatch("agent.fleet.transfer")
    a, link = start_agent(tmp_path, "pi-t", broker, keyring)
    folder = tmp_path / "pi-t" / "downloads" / host.idx["sha256"]
    try:
        assert wait_for(lambda: log.count("chunk hash mismatch") >= 1
                        and len(list(folder.glob("*.chunk"))) == host.n - 1, 20), (log.lines, host.n)
        assert a.current is None and not (folder / "0.chunk").exists()  # chunk 0 was refused
        link.stop()  # agent restart mid-transfer
        a, link = start_agent(tmp_path, "pi-t", broker, keyring)
        host.chunks([0])  # the publisher repairs chunk 0
        assert w.wait(lambda r: r.get("pi-t", {}).get("version") == 2, 30), w.reports
        t = w.reports["pi-t"]["transfer"]
        index_bytes = len(json.dumps(host.idx))
        assert t["mode"] == "full" and t["bytes"] <= 4096 + len(b"tampered") + 2 * index_bytes, (t, len(data))
    finally:
        log.close()
        link.stop()
        host.stop()
        w.stop()


@pytest.mark.device
def test_broker_restart_mid_transfer(tmp_path, broker, keyring, signing_key, fleet_bundles):
    """The broker goes down with half of the chunks on the device; after it comes back (retained messages
    persisted) the agent reconnects, fetches only the other half and installs."""
    data = fleet_bundles["v2"].read_bytes()
    host = Hand(broker, "host-r", data, signing_key, 4096)
    half = host.n // 2
    host.index()
    host.chunks(range(half))
    host.desire("pi-r")
    host.stop()
    a, link = start_agent(tmp_path, "pi-r", broker, keyring)
    folder = tmp_path / "pi-r" / "downloads" / host.idx["sha256"]
    w = None
    try:
        assert wait_for(lambda: len(list(folder.glob("*.chunk"))) == half, 30)
        assert link.status == "downloading" and a.current is None
        broker.stop()
        assert wait_for(lambda: not link.client.is_connected(), 30)
        broker.start()
        host = Hand(broker, "host-r2", data, signing_key, 4096)
        host.chunks(range(half, host.n))
        w = Watcher(broker)
        assert w.wait(lambda r: r.get("pi-r", {}).get("version") == 2, 60), w.reports
        t = w.reports["pi-r"]["transfer"]
        assert t["bytes"] < len(data) + 3 * len(json.dumps(host.idx)), (t, len(data))  # nothing fetched twice
    finally:
        link.stop()
        host.stop()
        if w:
            w.stop()


def test_embedded_broker_carries_an_update(tmp_path, keyring, signing_key, fleet_bundles):
    """The zero-set-up broker (amqtt) works with the same agent and publisher code."""
    from mosquitto import free_port
    from toolkit.fleet.broker import EmbeddedBroker

    eb = EmbeddedBroker(port=free_port()).start()
    try:
        a, link = start_agent(tmp_path, "pi-e", eb, keyring)
        try:
            publish(fleet_bundles["v1"], Broker.parse(eb.url), "test", signing_key, device="pi-e")
            end = time.time() + 60
            while time.time() < end and (a.current is None or a.current.manifest.version != 1):
                time.sleep(0.1)
            assert a.current is not None and a.current.manifest.version == 1
        finally:
            link.stop()
    finally:
        eb.stop()


@pytest.mark.device
def test_bundle_from_http_url(tmp_path, broker, keyring, signing_key, fleet_bundles):
    """The desired state may point at object storage: the agent downloads over HTTP and verifies the hash."""
    import functools
    import http.server

    (tmp_path / "www").mkdir()
    shutil.copy(fleet_bundles["v1"], tmp_path / "www" / "b.bundle")
    (tmp_path / "www" / "wrong.bundle").write_bytes(fleet_bundles["v2"].read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    w = Watcher(broker)
    a, link = start_agent(tmp_path, "pi-h", broker, keyring)
    try:
        publish(fleet_bundles["v1"], Broker.parse(broker.url), "test", signing_key, device="pi-h",
                url=f"{base}/wrong.bundle")  # content does not match the signed hash: refused
        assert w.wait(lambda r: "does not match bundle_sha256" in r.get("pi-h", {}).get("error", ""), 30), w.reports
        assert a.current is None
        publish(fleet_bundles["v1"], Broker.parse(broker.url), "test", signing_key, device="pi-h",
                url=f"{base}/b.bundle")
        assert w.wait(lambda r: r.get("pi-h", {}).get("version") == 1, 30), w.reports
        assert a.current.manifest.version == 1
    finally:
        link.stop()
        w.stop()
        srv.shutdown()


def _rollouts(tmp_path, broker, signing_key):
    from toolkit.fleet.publish import Publisher
    from toolkit.fleet.rollout import Rollouts

    b = Broker.parse(broker.url)
    return Rollouts(tmp_path / "registry.db", b, "test", lambda: Publisher(b, "test", signing_key), wait=0.5)


def test_staged_rollout_canary_then_rest(tmp_path, broker, keyring, signing_key, fleet_bundles):
    """Canary then the rest; a device that is offline during the rollout converges when it comes back."""
    agents = [start_agent(tmp_path, f"g-{i}", broker, keyring, group="line") for i in range(4)]
    w = Watcher(broker)
    try:
        publish(fleet_bundles["v1"], Broker.parse(broker.url), "test", signing_key, group="line")
        end = time.time() + 30
        while time.time() < end and not all(a.current and a.current.manifest.version == 1 for a, _ in agents):
            time.sleep(0.1)
        agents[3][1].stop()  # g-3 goes offline
        assert wait_for(lambda: w.online.get("g-3") is False, 10)
        ro = _rollouts(tmp_path, broker, signing_key)
        r = ro.start(fleet_bundles["v2"], "line", canary_pct=30, timeout=60)
        assert r["state"] == "completed", r
        assert r["plan"]["waves"] == [["g-0"], ["g-1", "g-2"]] and r["plan"]["offline"] == ["g-3"]
        assert all(a.current.manifest.version == 2 for a, _ in agents[:3])
        assert agents[3][0].current.manifest.version == 1
        agents[3] = start_agent(tmp_path, "g-3", broker, keyring, group="line")  # back online
        end = time.time() + 30
        while time.time() < end and agents[3][0].current.manifest.version != 2:
            time.sleep(0.1)
        assert agents[3][0].current.manifest.version == 2
        # the registry keeps it: a new host process sees the same rollout
        assert _rollouts(tmp_path, broker, signing_key).get(r["id"])["state"] == "completed"
        from click.testing import CliRunner

        from toolkit.cli import cli

        res = CliRunner().invoke(cli, ["--home", str(tmp_path), "rollout", "status", str(r["id"]), "--json"])
        assert res.exit_code == 0, res.output  # no broker, no signing key: it only reads the registry
        assert json.loads(res.output)[0]["state"] == "completed"
    finally:
        w.stop()
        for _, link in agents:
            link.stop()


def test_failing_canary_halts_and_rolls_back(tmp_path, broker, keyring, signing_key, fleet_bundles):
    """Canary wave of two: one installs, one refuses (wrong arch) -> halt; the good canary is rolled back
    to v1 and the rest of the group never sees v2."""
    from agent.fleet.link import FleetLink

    good = [start_agent(tmp_path, n, broker, keyring, group="cell") for n in ("c-a", "c-c")]
    bad_agent = Agent(tmp_path / "c-b", keyring, "x86_64")  # this device refuses aarch64 bundles
    bad_agent.start()
    bad_link = FleetLink(bad_agent, keyring, Broker.parse(broker.url), "test", "c-b", "cell")
    bad_link.start()
    w = Watcher(broker)
    try:
        for a, _ in good:
            assert a.install(fleet_bundles["v1"]).ok
        for _, link in good:
            link._report()
        assert w.wait(lambda r: all(r.get(n, {}).get("version") == 1 for n in ("c-a", "c-c")), 20), w.reports
        ro = _rollouts(tmp_path, broker, signing_key)
        r = ro.start(fleet_bundles["v2"], "cell", canary_pct=50, timeout=60)
        assert r["state"] == "halted" and "c-b" in r["error"] and "built for aarch64" in r["error"], r
        assert r["plan"]["waves"][0] == ["c-a", "c-b"]
        assert r["plan"]["results"]["c-a"] == "rolled-back"
        end = time.time() + 20
        while time.time() < end and good[0][0].current.manifest.version != 1:
            time.sleep(0.1)
        assert good[0][0].current.manifest.version == 1  # canary rolled back
        assert good[1][0].current.manifest.version == 1  # second wave never started
        with pytest.raises(Exception, match="only a running rollout"):
            ro.resume(r["id"])
    finally:
        w.stop()
        for _, link in good:
            link.stop()
        bad_link.stop()


class Traffic:
    """Requests on in-process agents from a thread each, like the callers of a device's API."""

    def __init__(self, agents, feed):
        self.stop_ev = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(a, feed), daemon=True) for a in agents]
        for t in self.threads:
            t.start()

    def _run(self, a, feed):
        i = 0
        while not self.stop_ev.is_set():
            i += 1
            try:
                a.predict(feed(a, i))
            except Exception:
                pass
            time.sleep(0.005)  # pacing, ~150 requests/s per device

    def stop(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(5)


def _baseline(db_path, devices, version=1, requests=100):
    """Wait until the collector holds ``requests`` of ``version`` per device (the pre-rollout window)."""
    from toolkit.fleet.collector import open_db

    def enough():
        db = open_db(db_path)
        try:
            got = dict(db.execute("SELECT device, SUM(count) FROM telemetry WHERE version = ? GROUP BY device",
                                  (version,)).fetchall())
        finally:
            db.close()
        return all((got.get(d) or 0) >= requests for d in devices)
    return wait_for(enough, 30, 0.2)


def _observed_rollout(tmp_path, broker, keyring, signing_key, v1, v2, names, feed, thresholds=Thresholds()):
    """Agents with telemetry on v1 under steady traffic, a collector running as a service, a baseline in its
    database; then a rollout of ``v2`` with a canary of one and a 3 s observation window. Returns the rollout
    once it ended, after checking that a halted canary is back on v1."""
    from agent.fleet.reporter import TelemetryConfig
    from toolkit.fleet.collector import Collector

    tele = TelemetryConfig(interval=0.3, heartbeat=1.0)
    agents = [start_agent(tmp_path, n, broker, keyring, group="obs", telemetry=tele) for n in names]
    col = Collector(Broker.parse(broker.url), "test", tmp_path / "fleet.db").start()  # `fleet collect`, as a service
    traffic = None
    try:
        for a, link in agents:
            assert a.install(v1).ok
            link._report()
        traffic = Traffic([a for a, _ in agents], feed)
        assert _baseline(tmp_path / "fleet.db", names)
        ro = _rollouts(tmp_path, broker, signing_key)
        ro.fleet_db = tmp_path / "fleet.db"
        r = ro.start(v2, "obs", canary_pct=33, timeout=60, observe=3.0, thresholds=thresholds)
        if r["state"] == "halted":
            assert len(r["plan"]["waves"][0]) == 1 and len(r["plan"]["waves"]) == 2
            assert r["plan"]["results"][r["plan"]["waves"][0][0]] == "rolled-back"
            assert wait_for(lambda: all(a.current.manifest.version == 1 for a, _ in agents), 20), \
                [(lk.device, a.current.manifest.version, lk.status, lk.error) for a, lk in agents]
        return r
    finally:
        if traffic:
            traffic.stop()
        col.stop()
        for _, link in agents:
            link.stop()


def test_canary_with_worse_error_rate_halts_on_telemetry(tmp_path, broker, keyring, signing_key, digits_build,
                                                          digits):
    """Every device installs v2 fine, but on the canary v2 fails a third of the requests it serves (its answer
    overflows to NaN on inputs at the edge of float32: a model failure, unlike a malformed request, which is
    the client's and not counted) -> the telemetry verdict halts and rolls it back. The build's fp32 LiteRT
    variant, bundled as v1 and v2: an int8 one (which the build may choose) clips such inputs instead."""
    import numpy as np

    from conftest import DEVICE_ARCH
    from modelkit import make_bundle

    with np.load(digits["validation"]) as v:
        x = v["image"].astype(np.float32)
    fp32 = next(v.file for p in digits_build.profiles if p.profile.name == "rpi4-arm64" for v in p.variants
                if v.runtime == "litert" and v.precision == "fp32")
    v1, v2 = (make_bundle(tmp_path / f"v{n}.bundle", signing_key, fp32.read_bytes(), {"image": x[:2]},
                          fmt="tflite", name="digits", version=n, arch=DEVICE_ARCH) for n in (1, 2))

    def feed(a, i):
        f = x[i % 100:][:2]
        if a.current and a.current.manifest.version == 2 and i % 3 == 0:
            f = np.full_like(f, 3e38)  # the v2 "regression": its answer is NaN here (withheld, an error)
        return f

    r = _observed_rollout(tmp_path, broker, keyring, signing_key, v1, v2, ("g-a", "g-b", "g-c"), feed)
    assert r["state"] == "halted" and "error rate" in r["error"], r


def test_canary_that_answers_differently_halts_though_not_slower_nor_failing(
        tmp_path, broker, keyring, signing_key, fleet_bundles, retrained_v2, digits):
    """v2 (a retrained head that answers class+1: an off-by-one label map) is as fast as v1 and fails no
    request. The traffic is mostly digits 0-3, as a real site's is skewed; the canary's predicted classes
    move away from the control's (the other devices on v1, same model, same group) -> halt and roll back."""
    import numpy as np

    from toolkit.fleet.collector import open_db

    with np.load(digits["validation"]) as v:
        skewed = v["image"].astype(np.float32)[v["y"] < 4]
    # sub-millisecond p95s jitter by more than 25% on a busy machine: this test is about the class verdict
    r = _observed_rollout(tmp_path, broker, keyring, signing_key, fleet_bundles["v1"], retrained_v2,
                          ("q-a", "q-b", "q-c"), lambda a, i: skewed[i % (len(skewed) - 2):][:2],
                          Thresholds(max_p95_increase=10.0))
    assert r["state"] == "halted" and "predicted classes" in r["error"], r
    db = open_db(tmp_path / "fleet.db")  # the canary on v2 was neither slower nor failing
    (n, errs), = db.execute("SELECT SUM(count), SUM(errors) FROM telemetry WHERE version = 2").fetchall()
    db.close()
    assert n >= 100 and errs == 0


def test_abort_from_another_process_stops_a_waiting_rollout(tmp_path, broker, keyring, signing_key, fleet_bundles,
                                                            settings):
    """`edgeship rollout start` runs as its own process; `edgeship rollout abort` (another process, with no
    broker options and no signing key) stops it within a poll."""
    import os
    import subprocess
    import sys

    from agent.keys import Keyring
    from toolkit.signing import load_or_create

    other = load_or_create(tmp_path / "other" / "signing.pem")
    deaf_ring = Keyring.of(other.public_raw)  # this device trusts another key: it never takes our desired state
    w = Watcher(broker)
    a, link = start_agent(tmp_path, "ab-0", broker, deaf_ring, group="ab")
    home = tmp_path / "home"
    log = tmp_path / "driver.log"
    driver = None
    try:
        assert w.wait(lambda r: "ab-0" in r, 20)
        with open(log, "wb") as out:
            driver = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "--home", str(home), "rollout", "start",
                                       str(fleet_bundles["v1"]), "--group", "ab", "--canary", "100%", "--timeout",
                                       "120", "--broker", broker.url, "--fleet", "test", "--key",
                                       str(signing_key.path)], stdout=out, stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert wait_for(lambda: "wave 1/1" in log.read_text(), 60), log.read_text()
        from click.testing import CliRunner

        from toolkit.cli import cli

        res = CliRunner().invoke(cli, ["--home", str(home), "rollout", "abort", "1"])
        assert res.exit_code == 0 and "aborted" in res.output, res.output
        assert driver.wait(30) == 1  # the driver noticed and stopped, saying so
        assert "rollout 1 aborted" in log.read_text(), log.read_text()
        assert a.current is None
    finally:
        if driver and driver.poll() is None:
            driver.kill()
        link.stop()
        w.stop()


def test_embedded_broker_sends_other_devices_topics_and_we_ignore_them(tmp_path, keyring, signing_key,
                                                                         fleet_bundles):
    """amqtt delivers, on connect, retained messages matching other clients' subscriptions: a second device
    gets the first one's desired state. It must not act on it nor report another device's error, and the
    host's views must not show it either."""
    from mosquitto import free_port
    from toolkit.fleet.broker import EmbeddedBroker
    from toolkit.fleet.collector import Collector, open_db
    from toolkit.fleet.watcher import devices

    eb = EmbeddedBroker(port=free_port()).start()
    b = Broker.parse(eb.url)
    links = []
    log = LogWatch("agent.fleet.link")
    try:
        a1, l1 = start_agent(tmp_path, "e-1", eb, keyring)
        links.append(l1)
        publish(fleet_bundles["v1"], b, "test", signing_key, device="e-1")
        assert wait_for(lambda: a1.current is not None, 30)
        spy = []  # what a second client is sent on connect
        c = make_client("spy", b)
        c.on_message = lambda cl, u, m: spy.append(m.topic)
        c.connect("127.0.0.1", eb.port)
        c.loop_start()
        c.subscribe("edgeship/v1/test/device/e-2/desired", 1)
        assert wait_for(lambda: "edgeship/v1/test/device/e-1/desired" in spy, 10), spy  # the broker's limit
        c.loop_stop()
        col = Collector(b, "other-fleet", tmp_path / "other.db").start()  # another fleet's collector
        a2, l2 = start_agent(tmp_path, "e-2", eb, keyring)
        links.append(l2)
        rows = {}
        assert wait_for(lambda: rows.update({d["device"]: d for d in devices(b, "test")}) or
                        rows.get("e-2", {}).get("status") == "idle", 20), rows
        assert rows["e-2"]["error"] == "" and rows["e-1"]["version"] == 1 and a2.current is None
        assert log.count("not for this device") == 0, log.lines
        col.stop()
        assert open_db(tmp_path / "other.db").execute("SELECT COUNT(*) FROM devices").fetchone()[0] == 0
    finally:
        log.close()
        for lk in links:
            lk.stop()
        eb.stop()


def test_fleet_devices_is_complete_on_a_slow_broker(tmp_path, broker, keyring):
    """Between the host and the broker, a link that delays every packet by 2 s: a fixed collection window of
    1.5 s saw no device at all; waiting for the SUBACK and the sync marker sees every one."""
    from agent.fleet.mqtt import Broker as B
    from slowlink import SlowLink
    from toolkit.fleet.watcher import devices

    w = Watcher(broker)
    agents = [start_agent(tmp_path, f"s-{i}", broker, keyring, group="slow") for i in range(3)]
    link = SlowLink(broker.port, delay=2.0).start()
    try:
        assert w.wait(lambda r: all(f"s-{i}" in r for i in range(3)), 20)
        rows = devices(B.parse(f"mqtt://127.0.0.1:{link.port}"), "test")
        assert sorted(r["device"] for r in rows) == ["s-0", "s-1", "s-2"]
        assert all(r["online"] and r["group"] == "slow" for r in rows), rows
    finally:
        link.stop()
        for _, lk in agents:
            lk.stop()
        w.stop()


def test_delta_update_is_applied_and_verified(tmp_path, broker, keyring, signing_key, fleet_bundles, retrained_v2):
    """v2 is a real new model (its classifier head retrained, rebuilt by the pipeline, new golden set), not v1
    re-signed: the patch carries the change and is still a fraction of the bundle (a head-only retrain: measured
    11%, 4.5 of 41 KB). Not a device test: v2 comes from the host's pipeline (TensorFlow)."""
    b = Broker.parse(broker.url)
    w = Watcher(broker)
    a, link = start_agent(tmp_path, "pi-d", broker, keyring)
    try:
        publish(fleet_bundles["v1"], b, "test", signing_key, device="pi-d")
        assert w.wait(lambda r: r.get("pi-d", {}).get("version") == 1), w.reports
        res = publish(retrained_v2, b, "test", signing_key, device="pi-d", delta_from=[fleet_bundles["v1"]])
        assert len(res["deltas"]) == 1
        assert w.wait(lambda r: r.get("pi-d", {}).get("version") == 2), w.reports
        t = w.reports["pi-d"]["transfer"]
        assert t["mode"] == "delta" and t["bytes"] < 0.25 * res["size"], (t, res["size"])
        assert w.reports["pi-d"]["installed_sha256"] == res["sha256"] and a.current.manifest.version == 2
        assert not list((tmp_path / "pi-d" / "downloads").iterdir())  # nothing left behind
    finally:
        link.stop()
        w.stop()
