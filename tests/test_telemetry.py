"""Telemetry on a real Mosquitto: store-and-forward over a broker outage (nothing lost, order kept,
exact drop count with a tiny bound), a collector that survives malformed messages, drift detection,
fleet status and report."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from agent.fleet.mqtt import Broker, make_client
from agent.fleet.reporter import TelemetryConfig
from agent.serve.service import Agent
from conftest import DEVICE_ARCH
from fleethelp import Watcher, needs_mosquitto, start_agent
from toolkit.fleet.collector import Collector, open_db
from toolkit.fleet.publish import publish

pytestmark = needs_mosquitto
OUTAGE_S = 60


@pytest.fixture(scope="module")
def digits_val(digits):
    with np.load(digits["validation"]) as v:
        return v["image"].astype(np.float32)


def _collector(broker, db, cid="test-collector"):
    col = Collector(Broker.parse(broker.url), "test", db, client_id=cid)
    col.client.reconnect_delay_set(1, 2)
    return col.start()


def _rows(db_path, device):
    db = open_db(db_path)
    try:
        return [dict(r) for r in db.execute("SELECT * FROM telemetry WHERE device = ? ORDER BY seq", (device,))]
    finally:
        db.close()


def _wait(pred, timeout=60.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.device
def test_outage_loses_nothing_and_the_drop_count_is_exact(tmp_path, broker, keyring, signing_key, fleet_bundles,
                                                           digits_val):
    db = tmp_path / "fleet.db"
    col = _collector(broker, db)
    w = Watcher(broker)
    big = TelemetryConfig(interval=0.5, heartbeat=1.0, queue_max=10_000)
    tiny = TelemetryConfig(interval=0.5, heartbeat=1.0, queue_max=5)
    agents = {name: start_agent(tmp_path, name, broker, keyring, group="tele", telemetry=cfg)
              for name, cfg in (("t-big", big), ("t-tiny", tiny))}
    for _, link in agents.values():
        link.client.reconnect_delay_set(1, 2)
    try:
        publish(fleet_bundles["v1"], Broker.parse(broker.url), "test", signing_key, group="tele")
        assert w.wait(lambda r: all(r.get(n, {}).get("version") == 1 for n in agents)), w.reports
        assert _wait(lambda: len(_rows(db, "t-big")) >= 2)
        broker.stop()
        served, failed = 0, 0
        end = time.time() + OUTAGE_S
        while time.time() < end:  # inference goes on without the broker
            for a, _ in agents.values():
                try:
                    a.predict(digits_val[:4])
                    served += 1
                except Exception:
                    failed += 1
            time.sleep(0.05)
        tiny_link = agents["t-tiny"][1]
        produced_tiny = tiny_link.reporter.outbox.peek(10)[0][-1][0]  # newest seq queued during the outage
        broker.start()
        assert served > 100 and failed == 0
        big_link = agents["t-big"][1]
        last_big = big_link.reporter.outbox.peek(10_000)[0][-1][0]
        assert _wait(lambda: len(_rows(db, "t-big")) and _rows(db, "t-big")[-1]["seq"] >= last_big, 90)
        rows = _rows(db, "t-big")
        seqs = [r["seq"] for r in rows]
        assert seqs == list(range(1, seqs[-1] + 1))  # every record, none twice
        assert seqs[-1] - seqs[0] >= OUTAGE_S / big.interval * 0.8
        outage = [r for r in rows if r["received"] > rows[0]["received"] + 1]
        assert [r["seq"] for r in sorted(outage, key=lambda r: r["received"])] == [r["seq"] for r in outage]
        assert sum(r["count"] for r in rows) >= served / 2 * 0.9  # the requests served offline were counted
        assert all(r["dropped"] == 0 for r in rows)
        # tiny bound: only the newest 5 of the outage survive, and the device says exactly how many it dropped
        assert _wait(lambda: any(r["seq"] >= produced_tiny for r in _rows(db, "t-tiny")), 90)
        tiny_rows = _rows(db, "t-tiny")
        after = [r for r in tiny_rows if r["dropped"] > 0]
        assert after, tiny_rows[-3:]
        first_kept = after[0]["seq"]
        before = [r["seq"] for r in tiny_rows if r["seq"] < first_kept]
        assert after[0]["dropped"] == first_kept - 1 - before[-1]  # exactly the gap
        assert [r["seq"] for r in after][:5] == list(range(first_kept, first_kept + 5))
    finally:
        for _, link in agents.values():
            link.stop()
        col.stop()
        w.stop()


def test_collector_survives_malformed_telemetry_and_status_and_report(tmp_path, broker, keyring, signing_key,
                                                                       fleet_bundles, digits_val, settings):
    from click.testing import CliRunner

    from toolkit.cli import cli

    db = tmp_path / "fleet.db"
    col = _collector(broker, db, cid="test-collector-2")
    evil = make_client("evil-telemetry", Broker.parse(broker.url))
    evil.connect("127.0.0.1", broker.port)
    evil.loop_start()
    a, link = start_agent(tmp_path, "t-ok", broker, keyring, group="g",
                          telemetry=TelemetryConfig(interval=0.3, heartbeat=1.0))
    try:
        publish(fleet_bundles["v1"], Broker.parse(broker.url), "test", signing_key, device="t-ok")
        assert _wait(lambda: a.current is not None)
        bad = [b"not json", b"\xff\xfe", b"[]", b'{"v": 2}', b'{"v": 1, "type": "telemetry"}',
               b'{"v": 1, "seq": "x"}', b'{"v": 1, "seq": 1, "inference": [1, 2]}',
               json.dumps({"v": 1, "seq": 10**30, "inference": {}}).encode(),
               b'{"v": 1, "type": "telemetry", "seq": 3, "inference": {"count": "many"}, "model": {"x": 1}, '
               b'"version": [1]}']
        for p in bad:
            evil.publish("edgeship/v1/test/device/evil/telemetry", p, qos=1).wait_for_publish(5)
        evil.publish("edgeship/v1/test/device/evil/extra/telemetry", b"{}", qos=1).wait_for_publish(5)
        for i in range(200):
            a.predict(digits_val[(2 * i) % (len(digits_val) - 2):][:2])
        assert _wait(lambda: sum(r["count"] for r in _rows(db, "t-ok")) >= 200, 30)
        assert _wait(lambda: col.rejected >= len(bad), 10) and col._writer.is_alive()
        assert col.rejected == len(bad)  # every malformed one (a count of "many" too), nothing else
        reasons = [r[0] for r in open_db(db).execute("SELECT reason FROM rejected")]
        assert any("count must be an integer" in r for r in reasons), reasons
        assert db.stat().st_size > 0 and open_db(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        home = ["--home", str(tmp_path / "h")]
        res = CliRunner().invoke(cli, [*home, "fleet", "status", "--db", str(db), "--json"])
        assert res.exit_code == 0, res.output
        rows = {r["device"]: r for r in json.loads(res.output)}
        ok = rows["t-ok"]
        assert ok["online"] and ok["version"] == 1 and ok["group"] == "g" and ok["error_rate"] == 0.0
        assert ok["p95_ms"] > 0 and ok["requests"] >= 200 and ok["drift"] is False
        res = CliRunner().invoke(cli, [*home, "fleet", "status", "--db", str(db)])
        assert res.exit_code == 0 and "t-ok" in res.output, res.output
        assert "1 devices, 1 online, 0 drifting" in res.output, res.output  # the evil messages made no device
        res = CliRunner().invoke(cli, [*home, "fleet", "report", "--db", str(db), "-o", str(tmp_path / "r.html")])
        assert res.exit_code == 0, res.output
        assert "data:image/png;base64" in (tmp_path / "r.html").read_text()
        link.stop()  # clean stop publishes offline
        assert _wait(lambda: not {r["device"]: r for r in json.loads(CliRunner().invoke(
            cli, [*home, "fleet", "status", "--db", str(db), "--json"]).output)}["t-ok"]["online"], 10)
    finally:
        link.stop()
        evil.loop_stop()
        col.stop()


@pytest.mark.device
def test_drift_flag_on_shifted_inputs_only(tmp_path, keyring, fleet_bundles, digits_val):
    a = Agent(tmp_path / "d", keyring, DEVICE_ARCH)
    assert a.install(fleet_bundles["v1"]).ok
    a.drift_every = 1
    for i in range(0, 300, 10):
        a.predict(digits_val[i % len(digits_val):][:10])
    ok = a.current.drift.snapshot()
    assert ok is not None and ok["flag"] is False, ok
    shifted = np.clip(digits_val[:300] * 0.3 + 0.6, 0, 1)  # washed-out camera: same shape, other distribution
    for i in range(0, 300, 10):
        a.predict(shifted[i:i + 10])
    bad = a.current.drift.snapshot()
    assert bad["flag"] is True and bad["max_psi"] > bad["threshold"], bad
    assert bad["inputs"][0]["mean_shift_std"] > ok["inputs"][0]["mean_shift_std"]


def test_offline_after_missed_heartbeats_and_watch(tmp_path):
    """Presence says online, but no heartbeat for 3 intervals -> offline; a last will -> offline at once."""
    from click.testing import CliRunner

    from toolkit.cli import cli
    from toolkit.fleet.collector import SQL, parse
    from toolkit.fleet.views import status

    db = open_db(tmp_path / "fleet.db")
    now = time.time()
    for dev, online, t in (("quiet", True, now - 100), ("alive", True, now - 5), ("gone", False, now - 1)):
        kind, row = parse("f", f"edgeship/v1/f/device/{dev}/presence",
                          json.dumps({"v": 1, "type": "presence", "online": online, "t": t, "heartbeat_s": 30}).encode())
        db.execute(SQL[kind], row)
    db.commit()
    rows = {r["device"]: r for r in status(db, now=now)}
    assert rows["alive"]["online"] and not rows["quiet"]["online"] and not rows["gone"]["online"]
    db.close()
    res = CliRunner().invoke(cli, ["--home", str(tmp_path / "h"), "fleet", "watch", "--db", str(tmp_path / "fleet.db"),
                                   "--iterations", "2", "--interval", "0.1"])
    assert res.exit_code == 0 and res.output.count("3 devices, 1 online") == 2, res.output


def test_shared_subscription_splits_telemetry_between_collectors(tmp_path, broker):
    """Two collectors in one shared-subscription group: every record is stored by exactly one of them."""
    b = Broker.parse(broker.url)
    cols = [Collector(b, "test", tmp_path / f"c{i}.db", share="grp").start() for i in range(2)]
    pub = make_client("tele-pub", b)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    try:  # start() returned after the SUBACK: nothing published from here on is missed
        for seq in range(1, 201):
            doc = {"v": 1, "type": "telemetry", "seq": seq, "device": "d1", "inference": {"count": 1, "errors": 0},
                   "system": {}, "drift": None}
            pub.publish("edgeship/v1/test/device/d1/telemetry", json.dumps(doc), qos=1).wait_for_publish(5)
        assert _wait(lambda: sum(c.stored for c in cols) >= 200, 30)
    finally:
        pub.loop_stop()
        for c in cols:
            c.stop()  # drains what arrived: a record stored twice would show in the counts below
    assert sum(c.stored for c in cols) == 200
    seqs = [{r["seq"] for r in _rows(tmp_path / f"c{i}.db", "d1")} for i in range(2)]
    assert seqs[0] | seqs[1] == set(range(1, 201)) and not seqs[0] & seqs[1]
    assert seqs[0] and seqs[1]  # both did part of the work


@pytest.mark.device
def test_cpu_temperature_from_sysfs_layout(tmp_path):
    """Raspberry Pi OS exposes millidegrees in /sys/class/thermal/thermal_zone*/temp; no zones -> None."""
    from agent.fleet.telemetry import cpu_temperature

    assert cpu_temperature(tmp_path) is None
    for i, v in enumerate(("48312", "51234", "garbage")):
        (tmp_path / f"thermal_zone{i}").mkdir()
        (tmp_path / f"thermal_zone{i}" / "temp").write_text(v + "\n")
    assert cpu_temperature(tmp_path) == 51.234


def test_collector_retention(tmp_path):
    """Old telemetry and old rejected-message notes are pruned; recent rows stay."""
    from toolkit.fleet import collector as c

    col = c.Collector(Broker.parse("mqtt://127.0.0.1:1"), "f", tmp_path / "fleet.db", retention_days=1)
    now = time.time()
    for seq, age_days in ((1, 3), (2, 0.5)):
        _, row = c.parse("f", "edgeship/v1/f/device/d/telemetry", json.dumps(
            {"v": 1, "type": "telemetry", "seq": seq, "t": now - age_days * 86400, "inference": {}}).encode())
        col.db.execute(c.SQL["telemetry"], row)
    col.db.executemany("INSERT INTO rejected VALUES (?,?,?)", [(now, "x", "bad")] * (c.MAX_REJECTED_ROWS + 5))
    col.db.commit()
    col.prune()
    assert [r[0] for r in col.db.execute("SELECT seq FROM telemetry")] == [2]
    assert col.db.execute("SELECT COUNT(*) FROM rejected").fetchone()[0] == c.MAX_REJECTED_ROWS
    col.db.close()


def test_fleet_collect_cli(tmp_path, broker, keyring):
    from click.testing import CliRunner

    from toolkit.cli import cli

    a, link = start_agent(tmp_path, "t-cli", broker, keyring, group="c",
                          telemetry=TelemetryConfig(interval=0.2, heartbeat=1.0))
    try:
        res = CliRunner().invoke(cli, ["--home", str(tmp_path / "h"), "fleet", "collect", "--broker", broker.url,
                                       "--fleet", "test", "--seconds", "2", "--client-id", "cli-collector"])
        assert res.exit_code == 0, res.output
        assert "stored" in res.output and "rejected 0" in res.output
        rows = _rows(tmp_path / "h" / "fleet.db", "t-cli")
        assert len(rows) >= 3 and rows[-1]["grp"] == "c"
    finally:
        link.stop()
