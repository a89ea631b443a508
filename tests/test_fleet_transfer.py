"""Bundle transfer faults on a real Mosquitto: deltas (and their fallback), duplicate and out-of-order
chunks, an agent killed mid-transfer and mid-install, a stale (replayed) retained desired state."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from agent.fleet.mqtt import Broker, make_client
from agent.fleet.protocol import bundle_topic, chunk_index, delta_topic
from conftest import DEVICE_ARCH
from fleethelp import Watcher, agent_process, needs_mosquitto, start_agent
from toolkit.fleet.publish import Publisher, base_content, publish

pytestmark = [needs_mosquitto, pytest.mark.device]


def _raw(broker, name):
    c = make_client(name, Broker.parse(broker.url))
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    return c


class Hand:
    """A publisher driven by hand: the index, chunks and signed desired state, each when the test says."""

    def __init__(self, broker, name, data, key, chunk_size):
        self.c, self.data, self.key = _raw(broker, name), data, key
        self.idx = chunk_index(data, chunk_size=chunk_size)
        self.prefix = bundle_topic("test", self.idx["sha256"])
        self.n = len(self.idx["chunks"])

    def _pub(self, topic, payload, retain):
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def index(self, payload=None, retain=True):
        self._pub(f"{self.prefix}/index", json.dumps(self.idx) if payload is None else payload, retain)

    def chunks(self, which, retain=True):
        cs = self.idx["chunk_size"]
        for i in which:
            self._pub(f"{self.prefix}/chunk/{i}", self.data[i * cs:(i + 1) * cs], retain)

    def desire(self, device):
        from agent.fleet.protocol import desired_doc, device_topic, sign_message

        doc = desired_doc("digits", 2, self.idx["sha256"], len(self.data), f"device:{device}")
        self._pub(device_topic("test", device, "desired"), sign_message(doc, self.key.key_id, self.key.sign), True)

    def stop(self):
        self.c.loop_stop()


def test_delta_update_is_applied_and_verified(tmp_path, broker, keyring, signing_key, fleet_bundles):
    b = Broker.parse(broker.url)
    w = Watcher(broker)
    a, link = start_agent(tmp_path, "pi-d", broker, keyring)
    try:
        publish(fleet_bundles["v1"], b, "test", signing_key, device="pi-d")
        assert w.wait(lambda r: r.get("pi-d", {}).get("version") == 1), w.reports
        res = publish(fleet_bundles["v2"], b, "test", signing_key, device="pi-d", delta_from=[fleet_bundles["v1"]])
        assert len(res["deltas"]) == 1
        assert w.wait(lambda r: r.get("pi-d", {}).get("version") == 2), w.reports
        t = w.reports["pi-d"]["transfer"]
        assert t["mode"] == "delta" and t["bytes"] < 0.15 * res["size"], t
        assert a.current.manifest.version == 2
        assert not list((tmp_path / "pi-d" / "downloads").iterdir())  # nothing left behind
    finally:
        link.stop()
        w.stop()


def test_corrupt_patch_falls_back_to_the_full_bundle(tmp_path, broker, keyring, signing_key, fleet_bundles):
    """A patch whose chunks are intact but which does not rebuild the signed bundle is dropped."""
    b = Broker.parse(broker.url)
    w = Watcher(broker)
    a, link = start_agent(tmp_path, "pi-c", broker, keyring)
    evil = _raw(broker, "evil-delta")
    try:
        publish(fleet_bundles["v1"], b, "test", signing_key, device="pi-c")
        assert w.wait(lambda r: r.get("pi-c", {}).get("version") == 1), w.reports
        v2 = fleet_bundles["v2"].read_bytes()
        sha, base = hashlib.sha256(v2).hexdigest(), hashlib.sha256(base_content(fleet_bundles["v1"])).hexdigest()
        pub = Publisher(b, "test", signing_key)
        info = pub.upload(fleet_bundles["v2"], [fleet_bundles["v1"]])
        # replace the patch with a well-formed zstd frame of the wrong content (chunk hashes match it)
        import zstandard

        bad = zstandard.ZstdCompressor().compress(b"x" * len(v2))
        idx = chunk_index(bad, delta={"target_sha256": sha, "target_size": len(v2), "base_sha256": base,
                                      "codec": "zstd", "window_log": 22})
        prefix = delta_topic("test", sha, base)
        for i in range(len(idx["chunks"])):
            cs = idx["chunk_size"]
            evil.publish(f"{prefix}/chunk/{i}", bad[i * cs:(i + 1) * cs], qos=1, retain=True).wait_for_publish(5)
        evil.publish(f"{prefix}/index", json.dumps(idx), qos=1, retain=True).wait_for_publish(5)
        pub.desire(info["model"], info["version"], sha, len(v2), device="pi-c")
        pub.close()
        assert w.wait(lambda r: r.get("pi-c", {}).get("version") == 2), w.reports
        assert w.reports["pi-c"]["transfer"]["mode"] == "full"
    finally:
        link.stop()
        evil.loop_stop()
        w.stop()


def test_duplicate_and_out_of_order_chunks(tmp_path, broker, keyring, signing_key, fleet_bundles):
    """Chunks sent last-to-first, each twice and not retained, after the agent asked for them."""
    host = Hand(broker, "host-ooo", fleet_bundles["v2"].read_bytes(), signing_key, 4096)
    w = Watcher(broker)
    a, link = start_agent(tmp_path, "pi-o", broker, keyring)
    try:
        host.index()
        host.desire("pi-o")
        assert w.wait(lambda r: r.get("pi-o", {}).get("status") == "downloading", 20), w.reports
        time.sleep(1.0)  # the agent subscribes to the chunks it lacks
        for i in reversed(range(host.n)):
            host.chunks([i, i], retain=False)
        assert w.wait(lambda r: r.get("pi-o", {}).get("version") == 2, 30), w.reports
        assert w.reports["pi-o"]["status"] == "installed"
        assert link._worker.is_alive()
    finally:
        link.stop()
        host.stop()
        w.stop()


def test_agent_killed_mid_install_converges_after_restart(tmp_path, broker, settings, signing_key,
                                                           fleet_bundles):
    w = Watcher(broker)
    keyring_dir = settings.keyring_path
    proc = agent_process(tmp_path, broker, keyring_dir, "pi-k", faults="VerifyModel=crash")
    try:
        publish(fleet_bundles["v1"], Broker.parse(broker.url), "test", signing_key, device="pi-k")
        assert proc.wait(timeout=120) == -9  # SIGKILL inside the install engine
        assert json.loads((tmp_path / "pi-k" / "state.json").read_text())["update"]["state"] == "VerifyModel"
        proc = agent_process(tmp_path, broker, keyring_dir, "pi-k")  # restart: recovery, then the fleet link resumes
        assert w.wait(lambda r: r.get("pi-k", {}).get("version") == 1 and r["pi-k"]["status"] == "installed",
                      90), w.reports
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        w.stop()


def test_stale_retained_desired_state_is_ignored(tmp_path, broker, keyring, signing_key, fleet_bundles):
    """An older signed desired state replayed as the retained message (or left behind by a broker) must not
    downgrade a device, neither live nor after the agent restarts."""
    from agent.fleet.protocol import device_topic

    b = Broker.parse(broker.url)
    topic = device_topic("test", "pi-s", "desired")
    grab = _raw(broker, "grab")
    old: list[bytes] = []
    grab.on_message = lambda c, u, m: old.append(m.payload)
    w = Watcher(broker)
    a, link = start_agent(tmp_path, "pi-s", broker, keyring)
    try:
        publish(fleet_bundles["v1"], b, "test", signing_key, device="pi-s")
        grab.subscribe(topic, 1)
        assert w.wait(lambda r: r.get("pi-s", {}).get("version") == 1), w.reports
        assert old, "the retained v1 desired state was not captured"
        publish(fleet_bundles["v2"], b, "test", signing_key, device="pi-s")
        assert w.wait(lambda r: r.get("pi-s", {}).get("version") == 2), w.reports
        grab.publish(topic, old[0], qos=1, retain=True).wait_for_publish(5)  # replay of the signed v1 state
        assert w.wait(lambda r: "stale desired state" in r.get("pi-s", {}).get("error", ""), 20), w.reports
        assert a.current.manifest.version == 2 and w.reports["pi-s"]["version"] == 2
        link.stop()
        a, link = start_agent(tmp_path, "pi-s", broker, keyring)  # restart: the stale state is retained
        time.sleep(2.0)
        assert a.current.manifest.version == 2 and w.reports["pi-s"]["status"] != "failed"
    finally:
        link.stop()
        grab.loop_stop()
        w.stop()


def test_agent_killed_mid_transfer_resumes_with_the_missing_chunks(tmp_path, broker, settings, signing_key,
                                                                    fleet_bundles):
    """kill -9 after half of the chunks are on disk; after a restart only the other half is fetched."""
    host = Hand(broker, "host-kill", fleet_bundles["v2"].read_bytes(), signing_key, 4096)
    n, half = host.n, host.n // 2
    w = Watcher(broker)
    host.index()
    host.chunks(range(half))
    host.desire("pi-m")
    proc = agent_process(tmp_path, broker, settings.keyring_path, "pi-m")
    folder = tmp_path / "pi-m" / "downloads" / host.idx["sha256"]
    try:
        end = time.time() + 60
        while time.time() < end and len(list(folder.glob("*.chunk"))) < half:
            time.sleep(0.1)
        assert len(list(folder.glob("*.chunk"))) == half
        proc.kill()  # SIGKILL mid-transfer
        proc.wait(30)
        host.chunks(range(half, n))
        proc = agent_process(tmp_path, broker, settings.keyring_path, "pi-m")
        assert w.wait(lambda r: r.get("pi-m", {}).get("version") == 2, 60), w.reports
        t = w.reports["pi-m"]["transfer"]
        assert t["mode"] == "full" and t["bytes"] < 0.6 * len(host.data) + 2 * len(json.dumps(host.idx)), t
    finally:
        proc.terminate()
        proc.wait(30)
        host.stop()
        w.stop()


def test_agent_that_dies_in_every_install_gives_up(tmp_path, broker, settings, signing_key, fleet_bundles):
    """A bundle that kills the agent during its install (e.g. a runtime abort) is tried 3 times, then the
    device reports it gave up instead of crash-looping; publishing it again (new desired state) retries."""
    from agent.fleet.desired import MAX_ATTEMPTS

    b = Broker.parse(broker.url)
    w = Watcher(broker)
    publish(fleet_bundles["v1"], b, "test", signing_key, device="pi-g")
    proc = None
    try:
        for _ in range(MAX_ATTEMPTS):
            proc = agent_process(tmp_path, broker, settings.keyring_path, "pi-g", faults="VerifyModel=crash")
            assert proc.wait(timeout=120) == -9
        proc = agent_process(tmp_path, broker, settings.keyring_path, "pi-g", faults="VerifyModel=crash")
        assert w.wait(lambda r: "gave up" in r.get("pi-g", {}).get("error", ""), 60), w.reports
        assert w.reports["pi-g"]["status"] == "failed" and w.reports["pi-g"]["version"] is None
        time.sleep(1.0)
        assert proc.poll() is None  # it did not try a 4th time
        proc.terminate()
        proc.wait(30)
        proc = agent_process(tmp_path, broker, settings.keyring_path, "pi-g")  # fixed agent, still gave up
        time.sleep(3.0)
        assert w.reports["pi-g"]["status"] == "failed"
        publish(fleet_bundles["v1"], b, "test", signing_key, device="pi-g")  # the operator retries
        assert w.wait(lambda r: r.get("pi-g", {}).get("version") == 1, 60), w.reports
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        w.stop()
    # on the device: `edgeship-agent status` shows the fleet state and the telemetry queue
    import hashlib as _h

    from click.testing import CliRunner

    from agent.cli import cli as agent_cli

    res = CliRunner().invoke(agent_cli, ["status", "--state-dir", str(tmp_path / "pi-g"), "--keyring",
                                         str(settings.keyring_path), "--arch", DEVICE_ARCH])
    doc = json.loads(res.output.strip().splitlines()[-1])
    assert doc["version"] == 1 and doc["fleet"]["desired"]["version"] == 1
    assert doc["fleet"]["installed_sha256"] == _h.sha256(fleet_bundles["v1"].read_bytes()).hexdigest()
    assert doc["fleet"]["error"] is None and doc["telemetry_queue"]["dropped"] == 0


def test_malformed_index_is_ignored_until_a_good_one_arrives(tmp_path, broker, keyring, signing_key, fleet_bundles):
    host = Hand(broker, "host-idx", fleet_bundles["v2"].read_bytes(), signing_key, 8192)
    idx = host.idx
    w = Watcher(broker)
    a, link = start_agent(tmp_path, "pi-i", broker, keyring)
    try:
        host.desire("pi-i")
        assert w.wait(lambda r: r.get("pi-i", {}).get("status") == "downloading", 20), w.reports
        for bad in (b"\x00garbage", b'{"v": 1, "type": "index"}', json.dumps({**idx, "chunks": idx["chunks"][:-1]}),
                    json.dumps({**idx, "size": 10**12}), json.dumps({**idx, "chunk_size": 0}),
                    json.dumps({**idx, "chunks": [1, 2, 3]})):
            host.index(bad, retain=False)
        time.sleep(1.0)
        assert link._worker.is_alive() and a.current is None
        host.index()
        time.sleep(0.5)
        host.chunks(range(host.n))
        assert w.wait(lambda r: r.get("pi-i", {}).get("version") == 2, 30), w.reports
    finally:
        link.stop()
        host.stop()
        w.stop()
