"""What a device trusts (agent/trust.py) and desired-state freshness (agent/fleet/desired.py), without a broker:
a keyring document counts only when the root signed it and its version grows; it is saved before it is used
and survives a restart; a revoked key or an expired keyring is refused with the reason; a plain keyring
folder (devices provisioned before rotation existed) keeps working; an expired desired state is refused, a
renewed one (same seq) extends the one held, and an expiry that passes is reported."""

from __future__ import annotations

import json
import time
import types
from time import time as time_now

import pytest

from agent.errors import ProtocolError, SignatureError, TrustError
from agent.fleet import desired as fd
from agent.fleet.protocol import desired_doc, keyring_doc, refreshed, sign_message
from agent.keys import Keyring
from agent.trust import Trust, load_trust
from fleethelp import Watcher, needs_mosquitto, start_agent
from toolkit.signing import generate_key



@pytest.fixture()
def keys(tmp_path):
    return {n: generate_key(tmp_path / "k" / f"{n}.pem") for n in ("root", "k1", "k2", "evil")}


def _ring(keys, version, trusted, revoked=(), expires_in=3600.0, signer="root"):
    doc = keyring_doc(version, {keys[n].key_id: keys[n].public_raw for n in trusted}, time.time() + expires_in,
                      [keys[n].key_id for n in revoked])
    return sign_message(doc, keys[signer].key_id, keys[signer].sign)


def _provision(tmp_path, keys, payload):
    (tmp_path / "dev").mkdir(exist_ok=True)
    (tmp_path / "dev" / "keyring.json").write_bytes(payload)
    return tmp_path / "dev" / "keyring.json", keys["root"].path.with_suffix(".pub")


def _signed(keys, name, message=b"manifest"):
    return keys[name].key_id, message, keys[name].sign(message)


def test_keyring_updates_only_from_the_root_and_only_upwards(tmp_path, keys):
    ring, root = _provision(tmp_path, keys, _ring(keys, 1, ["k1"]))
    state = tmp_path / "state"
    state.mkdir()
    t = load_trust(ring, root, state)
    t.verify(*_signed(keys, "k1"), "m")
    with pytest.raises(SignatureError, match="does not trust"):
        t.verify(*_signed(keys, "k2"), "m")
    with pytest.raises(ProtocolError, match="not signed by this device's root key"):
        t.offer(_ring(keys, 9, ["evil"], signer="evil"), "kr")  # a signing key cannot make itself the root
    with pytest.raises(ProtocolError, match="not signed by this device's root key"):
        t.offer(_ring(keys, 9, ["evil"], signer="k1"), "kr")
    v2 = _ring(keys, 2, ["k1", "k2"])
    assert t.offer(v2, "kr").version == 2 and t.offer(v2, "kr") is None  # the retained copy again: nothing
    assert (state / "keyring.json").read_bytes() == v2  # saved before use
    t.verify(*_signed(keys, "k2"), "m")
    with pytest.raises(ProtocolError, match="not newer"):
        t.offer(_ring(keys, 1, ["k1"]), "kr")  # a replay of an older keyring
    with pytest.raises(ProtocolError, match="expired"):
        t.offer(_ring(keys, 5, ["k1"], expires_in=-1), "kr")
    assert t.offer(_ring(keys, 3, ["k2"], revoked=["k1"]), "kr").version == 3
    with pytest.raises(SignatureError, match="revoked"):
        t.verify(*_signed(keys, "k1"), "m")
    again = load_trust(ring, root, state)  # a restart: the provisioned v1 is older than the saved v3
    assert again.doc.version == 3 and again.status()["revoked"] == [keys["k1"].key_id]
    from agentproc import run_cli  # what `status` says without a running agent: the keyring a start trusts

    doc = json.loads(run_cli("status", "--state-dir", state, "--keyring", ring, "--root-key", root).stdout)
    assert doc["agent"]["running"] is False and doc["keyring"]["version"] == 3
    (state / "keyring.json").write_bytes(_ring(keys, 7, ["evil"], signer="evil"))  # planted, not the root's
    assert load_trust(ring, root, state).doc.version == 1


def test_an_expired_keyring_refuses_everything_until_a_newer_one(tmp_path, keys):
    ring, root = _provision(tmp_path, keys, _ring(keys, 1, ["k1"], expires_in=60))
    clock = [time.time()]
    t = load_trust(ring, root)
    t.clock = lambda: clock[0]
    t.verify(*_signed(keys, "k1"), "m")
    clock[0] += 120
    with pytest.raises(SignatureError, match=r"keyring \(v1\) expired"):
        t.verify(*_signed(keys, "k1"), "m")
    t.clock = time.time
    t.offer(_ring(keys, 2, ["k1"]), "kr")
    t.verify(*_signed(keys, "k1"), "m")


def test_plain_keyring_folders_keep_working(tmp_path, keys):
    folder = tmp_path / "pubs"
    folder.mkdir()
    (folder / "k1.pub").write_bytes(keys["k1"].path.with_suffix(".pub").read_bytes())
    plain = load_trust(folder)  # no root key: as devices were provisioned before
    assert isinstance(plain, Keyring) and not isinstance(plain, Trust)
    plain.verify(*_signed(keys, "k1"), "m")
    anchored = load_trust(folder, keys["root"].path.with_suffix(".pub"))  # a root added later: v0 until v1
    assert anchored.doc.version == 0
    anchored.verify(*_signed(keys, "k1"), "m")
    assert anchored.offer(_ring(keys, 1, ["k2"]), "kr").version == 1
    with pytest.raises(TrustError, match="not a keyring document signed by the root"):
        load_trust(*_provision(tmp_path, keys, _ring(keys, 1, ["k1"], signer="k1")))


def _desired(keys, ttl=60.0, seq=None, signer="k1"):
    doc = desired_doc("digits", 2, "a" * 64, 100, "device:pi", ttl=ttl)
    if seq is not None:
        doc["seq"] = seq
    return doc, sign_message(doc, keys[signer].key_id, keys[signer].sign)


def test_desired_states_expire_and_renewals_extend_them(keys):
    ring = Keyring.of(keys["k1"].public_raw, keys["k2"].public_raw)
    st = {"seq": 0}
    doc, payload = _desired(keys, ttl=-1)
    with pytest.raises(ProtocolError, match="expired"):
        fd.accept(st, "t", payload, ring, "pi", "")
    doc, payload = _desired(keys, ttl=30)
    assert fd.accept(st, "t", payload, ring, "pi", "") is not None and fd.expired(st) == ""
    assert "expired at" in fd.expired(st, now=time.time() + 60)  # reported while the agent keeps serving
    renewed = refreshed(json.loads(payload), 3600)  # the same state (same seq), later expiry, the new key
    assert fd.accept(st, "t", sign_message(renewed, keys["k2"].key_id, keys["k2"].sign), ring, "pi", "") is None
    assert st["desired"]["expires"] == renewed["expires"] and fd.expired(st, now=time.time() + 60) == ""
    forged = dict(renewed, version=9)  # "renewing" with other content is not a renewal
    assert fd.accept(st, "t", sign_message(forged, keys["k2"].key_id, keys["k2"].sign), ring, "pi", "") is None
    assert st["desired"]["version"] == 2
    legacy = desired_doc("digits", 3, "b" * 64, 100, "device:pi")  # from an edgeship without expiry
    legacy_payload = sign_message(legacy, keys["k1"].key_id, keys["k1"].sign)
    with pytest.raises(ProtocolError, match="no expiry"):
        fd.accept(dict(st), "t", legacy_payload, ring, "pi", "", require_expiry=True)
    assert fd.accept(st, "t", legacy_payload, ring, "pi", "") is not None


@needs_mosquitto
def test_an_expired_desired_state_is_reported_while_serving_and_a_refresh_clears_it(tmp_path, broker, keyring,
                                                                                  signing_key, fleet_bundles,
                                                                                  monkeypatch):
    from agent.fleet import link as fleet_link
    from agent.fleet.mqtt import Broker
    from toolkit.fleet.publish import publish
    from toolkit.fleet.refresh import refresh

    monkeypatch.setattr(fleet_link, "CHECK_S", 0.2)  # how often an idle link looks (60 s in production)
    w = Watcher(broker)
    a, link = start_agent(tmp_path, "pi-x", broker, keyring)
    try:
        b = Broker.parse(broker.url)
        publish(fleet_bundles["v1"], b, "test", signing_key, device="pi-x", ttl=60)
        assert w.wait(lambda r: r.get("pi-x", {}).get("status") == "installed"), w.reports
        later = types.SimpleNamespace(**{**vars(time), "time": lambda: time_now() + 120})
        monkeypatch.setattr(fd, "time", later)  # the device's clock, two minutes on: its desired state expired
        assert w.wait(lambda r: "was not renewed" in r["pi-x"]["error"], 30), w.reports
        assert a.current.manifest.version == 1 and w.reports["pi-x"]["status"] == "installed"  # still serving
        rows = refresh(b, "test", signing_key, keyring, ttl=3600)
        assert [r["action"] for r in rows] == ["renewed"], rows
        assert w.wait(lambda r: r["pi-x"]["error"] == "", 30), w.reports
    finally:
        link.stop()
        w.stop()
