"""Encrypted bundles (`--encrypt`): sealed for the enrolled devices of a group — a device outside it cannot open
one, a tampered ciphertext is refused before any decryption, the model exists in clear only in the slot (0600);
and deltas keep working: an encrypted head-only update over MQTT costs about what the unencrypted delta does."""

from __future__ import annotations

import hashlib
import json
import stat
import tarfile

import pytest

from agent.seal import Opener
from agent.serve.service import Agent
from conftest import DEVICE_ARCH
from fleethelp import Watcher, needs_mosquitto, start_agent
from securityhelp import SecureHome, edgeship
from toolkit.fleet.sealing import seal_bundle

WIRE_RATIO = 2.0  # an encrypted head-only update may cost at most this many times the unencrypted delta


@pytest.fixture(scope="module")
def sec(tmp_path_factory, signing_key):
    s = SecureHome(tmp_path_factory.mktemp("sealed"), signing_key)
    for name, group in (("pi-s1", "s"), ("pi-s2", "s"), ("pi-out", "other")):
        s.enroll(name, group, "mqtts://broker.invalid:8883", fleet="test")
    return s


def _opener(sec, name):
    return Opener.load(sec.devices / name / "model.key")


@pytest.fixture(scope="module")
def sealed_v1(sec, fleet_bundles, signing_key):
    from toolkit.enroll import ca_of

    ca = ca_of(sec.settings)
    try:
        return seal_bundle(fleet_bundles["v1"], ca.recipients("test", group="s"), signing_key, sec.home / "sealed")
    finally:
        ca.close()


def _files(bundle):
    with tarfile.open(bundle) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_only_the_group_opens_it_and_the_model_is_clear_only_in_the_slot(tmp_path, sec, sealed_v1, keyring,
                                                                         fleet_bundles):
    plain = _files(fleet_bundles["v1"])
    model = json.loads(plain["manifest.json"])["model"]["path"]
    data = sealed_v1.path.read_bytes()
    for name in (model, "golden.npz"):  # no 64-byte stretch of the model or golden set is in the sealed file
        stretches = [plain[name][i:i + 64] for i in range(0, len(plain[name]) - 64, 4096)]
        stretches = [b for b in stretches if len(set(b)) > 16]  # not padding: a tar has runs of zeros of its own
        assert stretches and all(b not in data for b in stretches), name
    assert "encrypted for 2 device(s)" in edgeship(sec.home, "bundle", "verify", sealed_v1.path).output
    assert "are ciphertext" in edgeship(sec.home, "bundle", "inspect", sealed_v1.path).output
    inside = Agent(tmp_path / "in", keyring, DEVICE_ARCH, opener=_opener(sec, "pi-s1"))
    inside.start()
    res = inside.install(sealed_v1.path)
    assert res.status == "installed", res
    slot = tmp_path / "in" / "slots" / inside.current.slot
    assert (slot / model).read_bytes() == plain[model] and (slot / "golden.npz").read_bytes() == plain["golden.npz"]
    assert {stat.S_IMODE(f.stat().st_mode) for f in slot.iterdir()} == {0o600}
    assert stat.S_IMODE(slot.stat().st_mode) == 0o700
    assert inside.installed_sha256() == sealed_v1.sha256
    for name, opener in (("outside", _opener(sec, "pi-out")), ("no-key", None)):
        a = Agent(tmp_path / name, keyring, DEVICE_ARCH, opener=opener)
        a.start()
        res = a.install(sealed_v1.path)
        assert res.status == "refused" and res.chain == ["Verify", "Failure", "Cleanup"], res
        assert ("not for this one" if opener else "no model key") in res.reason, res.reason
        assert not list((tmp_path / name / "slots").iterdir()) and a.current is None


class CountingOpener(Opener):
    calls = 0

    def data_key(self, *a, **kw):
        CountingOpener.calls += 1
        return super().data_key(*a, **kw)


def test_tampered_ciphertext_is_refused_before_any_decryption(tmp_path, sec, sealed_v1, keyring):
    data = bytearray(sealed_v1.path.read_bytes())
    with tarfile.open(sealed_v1.path) as tar:
        m = next(m for m in tar.getmembers() if m.name.endswith((".tflite", ".onnx")))
    data[m.offset_data + m.size // 2] ^= 0x01  # one bit of the model's ciphertext
    bad = tmp_path / "tampered.bundle"
    bad.write_bytes(bytes(data))
    opener = CountingOpener((sec.devices / "pi-s1" / "model.key").read_bytes(), "model.key")
    a = Agent(tmp_path / "st", keyring, DEVICE_ARCH, opener=opener)
    a.start()
    res = a.install(bad)
    assert res.status == "refused" and "hash or size mismatch" in res.reason, res
    assert CountingOpener.calls == 0  # not even the data key was unwrapped
    assert a.install(sealed_v1.path).status == "installed" and CountingOpener.calls == 2  # Verify + Stage


@needs_mosquitto
def test_encrypted_rollout_with_deltas_costs_what_the_plain_delta_costs(tmp_path, sec, broker, keyring, fleet_bundles,
                                                                       retrained_v2):
    """`rollout start --encrypt` twice (v1, then the head-only retrained v2): the group's devices take v2 as a
    sealed delta; a plain device beside them takes the plain delta. Bytes received are compared."""
    conn = ["--broker", broker.url, "--fleet", "test"]
    w = Watcher(broker)
    agents = [start_agent(tmp_path, d, broker, keyring, group="s", opener=_opener(sec, d)) for d in ("pi-s1", "pi-s2")]
    plain = start_agent(tmp_path, "pi-plain", broker, keyring, group="p")
    try:
        assert w.wait(lambda r: {"pi-s1", "pi-s2", "pi-plain"} <= set(r)), w.reports
        for bundle in (fleet_bundles["v1"], retrained_v2):
            edgeship(sec.home, "rollout", "start", bundle, "--group", "s", "--canary", "100%", "--encrypt", *conn)
            edgeship(sec.home, "publish", bundle, "--device", "pi-plain", "--delta-from", fleet_bundles["v1"], *conn)
        v2_sha = hashlib.sha256(retrained_v2.read_bytes()).hexdigest()
        assert w.wait(lambda r: all(r[d].get("version") == 2 for d in ("pi-s1", "pi-s2", "pi-plain"))), w.reports
        sealed = [w.reports[d]["transfer"] for d in ("pi-s1", "pi-s2")]
        clear = w.reports["pi-plain"]["transfer"]
        assert clear["mode"] == "delta" and w.reports["pi-plain"]["installed_sha256"] == v2_sha
        for t, (a, _) in zip(sealed, agents):
            assert t["mode"] == "delta", t
            assert t["bytes"] <= WIRE_RATIO * clear["bytes"], (t, clear)
            assert a.current.manifest.data["encryption"] and a.current.manifest.version == 2
        print(f"\nencrypted delta {sealed[0]['bytes']} B vs plain delta {clear['bytes']} B "
              f"({sealed[0]['bytes'] / clear['bytes']:.2f}x); full sealed bundle {sealed[0]['bundle_bytes']} B")
    finally:
        for _, link in agents + [plain]:
            link.stop()
        w.stop()
