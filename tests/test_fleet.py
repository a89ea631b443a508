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
from fleethelp import Watcher, needs_mosquitto, start_agent
from toolkit.fleet.publish import publish

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
        time.sleep(0.5)
        assert a.current.manifest.version == 2 and link._worker.is_alive()
    finally:
        link.stop()
        bad.loop_stop()
        w.stop()


@pytest.mark.device
def test_tampered_chunk_is_ignored_and_transfer_resumes(tmp_path, broker, keyring, signing_key, fleet_bundles):
    """A corrupted retained chunk is refused; after the publisher repairs it, the agent finishes
    without re-downloading the chunks it already had (resume), and after an agent restart too."""
    from agent.fleet.protocol import bundle_topic, chunk_index

    data = fleet_bundles["v2"].read_bytes()
    idx = chunk_index(data)
    publish(fleet_bundles["v2"], Broker.parse(broker.url), "test", signing_key, device="pi-t")
    evil = make_client("evil2", Broker.parse(broker.url))
    evil.connect("127.0.0.1", broker.port)
    evil.loop_start()
    evil.publish(bundle_topic("test", idx["sha256"]) + "/chunk/0", b"tampered", qos=1, retain=True).wait_for_publish(5)
    w = Watcher(broker)
    a, link = start_agent(tmp_path, "pi-t", broker, keyring)
    try:
        assert w.wait(lambda r: r.get("pi-t", {}).get("status") == "downloading", 20)
        time.sleep(1.0)
        assert a.current is None  # chunk 0 was refused, nothing installed
        have = sorted(p.name for p in (tmp_path / "pi-t" / "downloads" / idx["sha256"]).iterdir())
        assert "0.chunk" not in have and len(have) == len(idx["chunks"]) - 1
        link.stop()  # agent restart mid-transfer
        a, link = start_agent(tmp_path, "pi-t", broker, keyring)
        evil.publish(bundle_topic("test", idx["sha256"]) + "/chunk/0", data[:idx["chunk_size"]], qos=1,
                     retain=True).wait_for_publish(5)
        assert w.wait(lambda r: r.get("pi-t", {}).get("version") == 2, 30), w.reports
    finally:
        link.stop()
        evil.loop_stop()
        w.stop()


@pytest.mark.device
def test_broker_restart_mid_transfer(tmp_path, broker, keyring, signing_key, fleet_bundles):
    publish(fleet_bundles["v1"], Broker.parse(broker.url), "test", signing_key, device="pi-r")
    broker.stop()  # retained messages are persisted by mosquitto
    a, link = start_agent(tmp_path, "pi-r", broker, keyring)
    try:
        time.sleep(1.5)
        broker.start()
        w = Watcher(broker)
        assert w.wait(lambda r: r.get("pi-r", {}).get("version") == 1, 60), w.reports
        w.stop()
    finally:
        link.stop()


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
    try:
        publish(fleet_bundles["v1"], Broker.parse(broker.url), "test", signing_key, group="line")
        end = time.time() + 30
        while time.time() < end and not all(a.current and a.current.manifest.version == 1 for a, _ in agents):
            time.sleep(0.1)
        agents[3][1].stop()  # g-3 goes offline
        time.sleep(0.5)
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

        res = CliRunner().invoke(cli, ["--home", str(tmp_path), "rollout", "status", str(r["id"]), "--broker",
                                       broker.url, "--fleet", "test", "--key", str(signing_key.path), "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)[0]["state"] == "completed"
    finally:
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
    try:
        for a, _ in good:
            assert a.install(fleet_bundles["v1"]).ok
        for _, link in good:
            link._report()
        time.sleep(0.5)
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
        for _, link in good:
            link.stop()
        bad_link.stop()


def test_canary_with_worse_error_rate_halts_on_telemetry(tmp_path, broker, keyring, signing_key, fleet_bundles,
                                                          digits):
    """Every device installs v2 fine, but on the canary v2 fails a third of the requests it serves (its
    callers send the input v1 accepted, reshaped) -> the telemetry verdict halts and rolls it back."""
    import numpy as np

    from agent.fleet.reporter import TelemetryConfig

    with np.load(digits["validation"]) as v:
        x = v["image"].astype(np.float32)
    tele = TelemetryConfig(interval=0.3, heartbeat=1.0)
    agents = [start_agent(tmp_path, n, broker, keyring, group="tg", telemetry=tele) for n in ("g-a", "g-b", "g-c")]
    stop = threading.Event()

    def traffic(a):
        i = 0
        while not stop.is_set():
            i += 1
            feed = x[i % 100:][:2]
            if a.current and a.current.manifest.version == 2 and i % 3 == 0:
                feed = feed.reshape(2, -1)  # the v2 "regression": this input no longer fits
            try:
                a.predict(feed)
            except Exception:
                pass
            time.sleep(0.005)

    threads = [threading.Thread(target=traffic, args=(a,), daemon=True) for a, _ in agents]
    try:
        for a, link in agents:
            assert a.install(fleet_bundles["v1"]).ok
            link._report()
        for t in threads:
            t.start()
        time.sleep(2.0)  # baseline telemetry on v1
        ro = _rollouts(tmp_path, broker, signing_key)
        ro.fleet_db = tmp_path / "fleet.db"
        r = ro.start(fleet_bundles["v2"], "tg", canary_pct=33, timeout=60, observe=3.0)
        assert r["state"] == "halted" and "error rate" in r["error"], r
        assert len(r["plan"]["waves"][0]) == 1 and len(r["plan"]["waves"]) == 2
        canary = r["plan"]["waves"][0][0]
        assert r["plan"]["results"][canary] == "rolled-back"
        end = time.time() + 20
        while time.time() < end and any(a.current.manifest.version != 1 for a, _ in agents):
            time.sleep(0.1)
        assert all(a.current.manifest.version == 1 for a, _ in agents), [(l.device, a.current.manifest.version, l.status, l.error) for a, l in agents]
    finally:
        stop.set()
        for _, link in agents:
            link.stop()


def test_abort_from_another_process_stops_a_waiting_rollout(tmp_path, broker, keyring, signing_key, fleet_bundles):
    """`edgeship rollout abort` in another process: the running driver notices within a poll and stops."""
    from agent.keys import Keyring
    from toolkit.signing import load_or_create

    other = load_or_create(tmp_path / "other" / "signing.pem")
    deaf_ring = Keyring.of(other.public_raw)  # this device trusts another key: it never takes our desired state
    a, link = start_agent(tmp_path, "ab-0", broker, deaf_ring, group="ab")
    try:
        time.sleep(0.5)
        ro = _rollouts(tmp_path, broker, signing_key)  # the operator's second process
        box: dict = {}
        t = threading.Thread(target=lambda: box.update(r=_rollouts(tmp_path, broker, signing_key).start(
            fleet_bundles["v1"], "ab", 100, timeout=120)))
        t0 = time.time()
        t.start()
        while not ro.list() and time.time() - t0 < 20:
            time.sleep(0.1)
        time.sleep(1.0)
        rid = ro.list()[0]["id"]
        assert _rollouts(tmp_path, broker, signing_key).abort(rid)["state"] == "aborted"
        t.join(30)
        assert not t.is_alive() and box["r"]["state"] == "aborted" and time.time() - t0 < 30
        assert a.current is None
    finally:
        link.stop()
