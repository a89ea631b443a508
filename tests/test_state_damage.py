"""A damaged or full state dir around the newer state files (fleet.json, the capture and label queues, the
keyring): the agent starts and serves, says what it set aside, and a write that failed on a full disk is
neither half-applied nor forgotten."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from agent.bundle import Limits
from agent.capture.policy import CaptureConfig
from agent.capture.recorder import Capture, Recent
from agent.errors import HTTPError
from agent.fleet.desired import load_state
from agent.fleet.link import FleetLink
from agent.fleet.mqtt import Broker
from agent.fleet.outbox import Outbox
from agent.fleet.protocol import capture_request_doc, device_topic, sign_message
from agent.serve.service import Agent
from conftest import DEVICE_ARCH
from test_install_limits import _fill, small_disk  # noqa: F401 (a fixture)

UNREACHABLE = Broker.parse("mqtt://127.0.0.1:1")  # the link never connects: messages go straight to its worker

pytestmark = pytest.mark.device


@pytest.mark.parametrize("text", ["[]", "null", '{"desired": "x"}', "{trunc"])
def test_a_fleet_state_that_is_not_one_starts_over(tmp_path, keyring, fleet_bundles, text, caplog):
    a = Agent(tmp_path / "d", keyring, DEVICE_ARCH)
    assert a.install(fleet_bundles["v1"]).ok
    (a.store.dir / "fleet.json").write_text(text)
    assert load_state(a.store.dir)["seq"] == 0
    link = FleetLink(a, keyring, UNREACHABLE, "f", "d1", telemetry=None)  # was: AttributeError, a restart loop
    assert link.status == "idle" and a.current.manifest.version == 1 and "fleet.json" in caplog.text


@pytest.mark.parametrize("content", [b"garbage " * 100, b"SQLite format 3\x00" + b"\xff" * 4000])
def test_a_damaged_queue_is_set_aside_and_a_new_one_started(tmp_path, content):
    (tmp_path / "capture.db").write_bytes(content)
    box = Outbox(tmp_path / "capture.db")
    assert box.put("t", {"a": 1}) == 1 and len(box) == 1
    box.close()
    aside = [p.name for p in tmp_path.glob("capture.db.corrupt-*")]
    assert len(aside) == 1 and (tmp_path / aside[0]).read_bytes() == content


def test_full_disk_feedback_is_a_507_and_a_capture_request_is_applied_when_sent_again(
        tmp_path, small_disk, keyring, signing_key, fleet_bundles):
    a = Agent(small_disk / "state", keyring, DEVICE_ARCH, limits=Limits(min_free_bytes=0))
    assert a.install(fleet_bundles["v1"]).ok
    a.capture = Capture(CaptureConfig(enabled=True), a.store.dir)
    link = FleetLink(a, keyring, UNREACHABLE, "f", "d1", telemetry=None)
    rec = Recent("digits", 1, 1.0, (3,), (0.9,), False, 10)
    # the label queue's pages are made on first use; then the disk fills up
    a.capture.feedback("warm-up", rec, [3])
    _fill(small_disk, 0)
    with pytest.raises(HTTPError) as exc:
        for i in range(200):  # SQLite's cache may hold a few before a page must be written
            a.capture.feedback(f"r{i}", rec, [3])
    assert exc.value.status == 507 and "labels.db" in str(exc.value)
    doc = capture_request_doc("device:d1", 10)
    payload = sign_message(doc, signing_key.key_id, signing_key.sign)
    topic = device_topic("f", "d1", "capture_request")
    with pytest.raises(OSError):
        link._on_capture_request(topic, payload)  # not saved: not applied either
    assert not a.capture.everything_until
    (small_disk / "filler").unlink()
    link._on_capture_request(topic, payload)  # the broker's next delivery of the retained request
    assert a.capture.everything_until > doc["t"] and load_state(a.store.dir)["capture"]["seq"] == doc["seq"]
    a.capture.outbox.close()
    a.capture.labels.close()


def test_captures_not_stored_do_not_spend_the_budget(tmp_path, small_disk, keyring, fleet_bundles, digits):
    a = Agent(small_disk / "state", keyring, DEVICE_ARCH, limits=Limits(min_free_bytes=0))
    assert a.install(fleet_bundles["v1"]).ok
    cap = Capture(CaptureConfig(enabled=True, rate=1.0), a.store.dir)
    with np.load(digits["validation"]) as v:
        x = v["image"][:1].astype(np.float32)
    cur = a.current
    out = a.predict(x)
    cap._store(cur, [x], out, "r-first", 1.0, ["rate"])
    _fill(small_disk, 0)
    failed = 0
    for i in range(50):
        try:
            cap._store(cur, [x], out, f"r-{i:05d}", 1.0, ["rate"])
        except (sqlite3.Error, OSError):
            failed += 1
    assert failed  # the disk really was full
    assert cap._budget_used(1.0) == cap.outbox.get("budget_used")  # what was spent is what was stored
    cap.outbox.close()
    cap.labels.close()
