"""The fleet link tells the truth and cleans up after itself, on a real Mosquitto: after a kill during
Cleanup the first report already says what is served; an install that raises, or a hostile golden set,
ends as `failed` with its cause (never `installing` for good); superseded downloads are deleted."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time

from agent.fleet.mqtt import Broker, make_client
from fleethelp import agent_process, needs_mosquitto, start_agent
from test_fleet_transfer import Hand
from test_install import rebundle, rewrite_outputs
from toolkit.fleet.publish import publish

pytestmark = needs_mosquitto


class Reports:
    """Every reported state of the fleet "test", in the order they arrive (retained ones first)."""

    def __init__(self, broker):
        self.got: list[dict] = []
        self.c = make_client(f"reports-{time.time_ns()}", Broker.parse(broker.url))
        self.c.on_message = lambda c, u, m: m.payload and self.got.append(json.loads(m.payload))
        self.c.connect("127.0.0.1", broker.port)
        self.c.subscribe("edgeship/v1/test/device/+/reported", qos=1)
        self.c.loop_start()

    def wait(self, pred, since: int = 0, timeout: float = 60) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            for r in self.got[since:]:
                if pred(r):
                    return r
            time.sleep(0.05)
        raise AssertionError(f"no such report; got {self.got[since:]}")

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_killed_in_cleanup_reports_what_it_serves_from_the_first_report(tmp_path, broker, settings, signing_key,
                                                                         fleet_bundles):
    sha = hashlib.sha256(fleet_bundles["v1"].read_bytes()).hexdigest()
    reports = Reports(broker)
    proc = agent_process(tmp_path, broker, settings.keyring_path, "pi-c", faults="Cleanup=crash")
    try:
        publish(fleet_bundles["v1"], Broker.parse(broker.url), "test", signing_key, device="pi-c")
        assert proc.wait(timeout=120) == -9  # killed in Cleanup: v1 is active, the download is still there
        assert json.loads((tmp_path / "pi-c" / "state.json").read_text())["update"]["state"] == "Cleanup"
        assert list((tmp_path / "pi-c" / "downloads").iterdir())
        since = len(reports.got)
        proc = agent_process(tmp_path, broker, settings.keyring_path, "pi-c")
        first = reports.wait(lambda r: r["device"] == "pi-c", since)
        assert (first["status"], first["version"], first["installed_sha256"]) == ("installed", 1, sha), first
        assert list((tmp_path / "pi-c" / "downloads").iterdir()) == []
        assert json.loads((tmp_path / "pi-c" / "fleet.json").read_text())["installed_sha256"] == sha
    finally:
        proc.terminate()
        proc.wait(30)
        reports.stop()


def test_an_install_that_raises_ends_failed_with_its_cause(tmp_path, broker, keyring, signing_key, fleet_bundles):
    """An unreadable state file (a corrupted SD card) makes the engine raise before its state machine runs;
    a golden set that declares 256 TiB used to raise MemoryError. Both end as `failed`, with the cause."""
    import numpy as np

    reports = Reports(broker)
    a, link = start_agent(tmp_path, "pi-f", broker, keyring)
    b = Broker.parse(broker.url)
    try:
        publish(fleet_bundles["v1"], b, "test", signing_key, device="pi-f")
        reports.wait(lambda r: r["device"] == "pi-f" and r["status"] == "installed")

        def huge(arr):
            buf = io.BytesIO()
            np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                                       "shape": (1 << 40, 64)})
            return buf.getvalue() + arr.tobytes()

        with tarfile.open(fleet_bundles["v2"]) as tar:
            golden = tar.extractfile("golden.npz").read()
        hostile = rebundle(fleet_bundles["v2"], tmp_path / "hostile.bundle", signing_key,
                           files={"golden.npz": rewrite_outputs(golden, huge)})
        since = len(reports.got)
        publish(hostile, b, "test", signing_key, device="pi-f")
        r = reports.wait(lambda r: r["status"] in ("failed", "installed"), since)
        assert r["status"] == "failed" and "declares 281474976710656 bytes" in r["error"] and r["version"] == 1, r
        (tmp_path / "pi-f" / "state.json").write_text("{ torn")
        since = len(reports.got)
        publish(fleet_bundles["v2"], b, "test", signing_key, device="pi-f")
        r = reports.wait(lambda r: r["status"] in ("failed", "installed"), since)
        assert r["status"] == "failed" and "unreadable agent state" in r["error"], r
        assert r["version"] == 1 and a.current.manifest.version == 1 and link._worker.is_alive()
    finally:
        link.stop()
        reports.stop()


def test_superseded_partial_downloads_are_deleted(tmp_path, broker, keyring, signing_key, fleet_bundles):
    first = Hand(broker, "host-a", fleet_bundles["v2"].read_bytes(), signing_key, 4096)
    second = Hand(broker, "host-b", fleet_bundles["v1"].read_bytes(), signing_key, 4096)
    downloads = tmp_path / "pi-p" / "downloads"
    a, link = start_agent(tmp_path, "pi-p", broker, keyring)
    try:
        for host in (first, second):  # half of each bundle arrives, then a newer desired state replaces it
            host.index()
            host.chunks(range(host.n // 2))
            host.desire("pi-p")
            folder = downloads / host.idx["sha256"]
            end = time.time() + 30
            while time.time() < end and len(list(folder.glob("*.chunk"))) < host.n // 2:
                time.sleep(0.05)
            assert len(list(folder.glob("*.chunk"))) == host.n // 2
        assert [p.name for p in downloads.iterdir()] == [second.idx["sha256"]]
    finally:
        link.stop()
        first.stop()
        second.stop()
    (downloads / f".{first.idx['sha256']}.bundle.k2j3h4xz").write_bytes(b"torn")  # a killed write's leftover
    (downloads / first.idx["sha256"]).mkdir()
    a, link = start_agent(tmp_path, "pi-p", broker, keyring)  # restart: only the pending transfer's files stay
    link.stop()
    assert [p.name for p in downloads.iterdir()] == [second.idx["sha256"]]
