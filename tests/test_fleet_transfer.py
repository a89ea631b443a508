"""Bundle transfer faults on a real Mosquitto: deltas (and their fallback), duplicate and out-of-order
chunks, an agent killed mid-transfer and mid-install, a stale (replayed) retained desired state."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from agent.fleet.mqtt import Broker, make_client
from agent.fleet.protocol import Patch, delta_topic, encode, index_doc
from conftest import DEVICE_ARCH
from fleethelp import Hand, LogWatch, Watcher, agent_process, needs_mosquitto, start_agent, wait_for
from toolkit.fleet.publish import Publisher, base_content, publish

pytestmark = [needs_mosquitto, pytest.mark.device]


def _raw(broker, name):
    c = make_client(name, Broker.parse(broker.url))
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    return c


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
        idx = index_doc(bad, delta=Patch(sha, len(v2), base, "zstd", 22))
        prefix = delta_topic("test", sha, base)
        for i in range(len(idx["chunks"])):
            cs = idx["chunk_size"]
            evil.publish(f"{prefix}/chunk/{i}", bad[i * cs:(i + 1) * cs], qos=1, retain=True).wait_for_publish(5)
        evil.publish(f"{prefix}/index", encode(idx), qos=1, retain=True).wait_for_publish(5)
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
        chunks = [f"{host.prefix}/chunk/{i}" for i in range(host.n)]
        assert wait_for(lambda: link.subs.has(*chunks), 20), "the agent did not subscribe to the chunks"
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
        restarted = time.time()
        a, link = start_agent(tmp_path, "pi-s", broker, keyring)  # restart: the stale state is retained
        assert w.wait(lambda r: r["pi-s"]["t"] > restarted and "stale desired state" in r["pi-s"]["error"], 20), \
            w.reports["pi-s"]  # the restarted agent got the retained stale state and refused it again
        assert a.current.manifest.version == 2 and w.reports["pi-s"]["status"] != "failed"
        assert w.reports["pi-s"]["version"] == 2
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
        state = json.loads((tmp_path / "pi-g" / "fleet.json").read_text())
        assert state["attempts"]["n"] == MAX_ATTEMPTS and proc.poll() is None  # no 4th attempt was counted
        proc.terminate()
        proc.wait(30)
        restarted = time.time()
        proc = agent_process(tmp_path, broker, settings.keyring_path, "pi-g")  # fixed agent, still gave up
        assert w.wait(lambda r: r["pi-g"]["t"] > restarted, 60), w.reports["pi-g"]  # its first report
        assert w.reports["pi-g"]["status"] == "failed" and "gave up" in w.reports["pi-g"]["error"]
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
    """Each bad index reaches the agent (it is subscribed to the index when they are sent) and is refused
    with a log line; the good one that follows is used."""
    host = Hand(broker, "host-idx", fleet_bundles["v2"].read_bytes(), signing_key, 8192)
    idx = host.idx
    w = Watcher(broker)
    log = LogWatch("agent.fleet.link")
    a, link = start_agent(tmp_path, "pi-i", broker, keyring)
    bad = [b"\x00garbage", b'{"v": 1, "type": "index"}', json.dumps({**idx, "chunks": idx["chunks"][:-1]}),
           json.dumps({**idx, "size": 10**12}), json.dumps({**idx, "chunk_size": 0}),
           json.dumps({**idx, "chunks": [1, 2, 3]})]
    try:
        host.desire("pi-i")
        assert w.wait(lambda r: r.get("pi-i", {}).get("status") == "downloading", 20), w.reports
        assert wait_for(lambda: link.subs.has(f"{host.prefix}/index"), 20)
        for n, payload in enumerate(bad, 1):
            host.index(payload, retain=False)
            assert wait_for(lambda: log.count("ignored message") >= n, 20), log.lines
        assert link._worker.is_alive() and a.current is None
        assert log.count("ignored message") == len(bad), log.lines
        host.index()
        host.chunks(range(host.n))
        assert w.wait(lambda r: r.get("pi-i", {}).get("version") == 2, 30), w.reports
    finally:
        log.close()
        link.stop()
        host.stop()
        w.stop()
