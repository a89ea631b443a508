"""The bundle contract (agent side): signing, hashing, canonical form, safe reading. No TensorFlow."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives import serialization

from agent.bundle import extract_bundle, inspect_bundle, verify_bundle, write_bundle
from agent.errors import BundleError, ManifestError, SignatureError
from agent.keys import Keyring, key_id

pytestmark = pytest.mark.device


def _key():
    k = Ed25519PrivateKey.generate()
    raw = k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return k, raw


def _manifest(**over):
    m = {"name": "toy", "version": 3, "profile": "rpi4-arm64", "arch": "aarch64", "format": "tflite",
         "precision": "int8", "runtime": {"name": "litert", "min_version": "2.3.0", "threads": 4},
         "model": {"path": "model.tflite"},
         "inputs": [{"name": "x", "dtype": "int8", "shape": [-1, 4],
                     "quantization": {"scale": 0.5, "zero_point": -1}}],
         "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 2]}],
         "golden": {"path": "golden.npz", "atol": 0.01, "rtol": 0.001, "count": 1}}
    m.update(over)
    return m


FILES = {"model.tflite": b"TFL3" + bytes(range(60)), "golden.npz": b"PK-golden"}


@pytest.fixture()
def signed(tmp_path):
    k, raw = _key()
    path = tmp_path / "toy.bundle"
    write_bundle(path, _manifest(), FILES, k.sign, key_id(raw))
    return path, Keyring.of(raw), k, raw


def test_roundtrip_and_extract(signed, tmp_path):
    path, ring, _, raw = signed
    m = verify_bundle(path, ring)
    assert (m.name, m.version, m.key_id, m.model_file) == ("toy", 3, key_id(raw), "model.tflite")
    assert m.inputs[0].quantized and m.inputs[0].zero_point == -1
    dest = tmp_path / "slot"
    extract_bundle(path, ring, dest)
    assert (dest / "model.tflite").read_bytes() == FILES["model.tflite"]
    assert sorted(p.name for p in dest.iterdir()) == ["golden.npz", "manifest.json", "manifest.sig",
                                                      "model.tflite"]


def test_reproducible_bytes(tmp_path):
    k, raw = _key()
    a, b = tmp_path / "a.bundle", tmp_path / "b.bundle"
    write_bundle(a, _manifest(), FILES, k.sign, key_id(raw))
    write_bundle(b, _manifest(), dict(reversed(list(FILES.items()))), k.sign, key_id(raw))
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["manifest.json", "manifest.sig", "golden.npz", "model.tflite"]
    assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" and m.mode == 0o644 for m in members)


def test_every_changed_byte_is_caught(signed):
    path, ring, _, _ = signed
    original = path.read_bytes()
    missed = []
    for i in range(len(original)):
        data = bytearray(original)
        data[i] ^= 0x01
        path.write_bytes(bytes(data))
        try:
            verify_bundle(path, ring)
            missed.append(i)
        except BundleError:
            pass
    path.write_bytes(original)
    assert missed == [], f"changed bytes not detected at offsets {missed[:10]}"
    verify_bundle(path, ring)


def test_truncated_bundle(signed):
    path, ring, _, _ = signed
    data = path.read_bytes()
    for cut in (100, 700, 1500, len(data) - 600, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(BundleError):
            verify_bundle(path, ring)


def test_unknown_key_and_bad_signature(signed):
    path, ring, _, _ = signed
    _, other = _key()
    with pytest.raises(SignatureError, match="does not trust"):
        verify_bundle(path, Keyring.of(other))
    # a re-signed manifest by an untrusted key naming the trusted key id
    evil, _ = _key()
    kid = next(iter(ring.keys))
    write_bundle(path, _manifest(), FILES, evil.sign, kid)
    with pytest.raises(SignatureError, match="signature does not match"):
        verify_bundle(path, ring)


def test_keyring_rotation(tmp_path):
    from agent.keys import encode_public_key

    old, old_raw = _key()
    new, new_raw = _key()
    (tmp_path / "old.pub").write_text(encode_public_key(old_raw))
    (tmp_path / "new.pub").write_text(encode_public_key(new_raw))
    ring = Keyring.load(tmp_path)
    for k, raw in ((old, old_raw), (new, new_raw)):
        p = tmp_path / f"{key_id(raw)}.bundle"
        write_bundle(p, _manifest(), FILES, k.sign, key_id(raw))
        assert verify_bundle(p, ring).key_id == key_id(raw)


def _raw_tar(path, entries):
    with tarfile.open(path, "w") as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "device", "dir", "duplicate", "many"])
def test_unsafe_entries_refused(tmp_path, signed, kind):
    _, ring, _, _ = signed
    good = tarfile.TarInfo("model.tflite")
    good.size = 4
    entries = [(good, b"abcd")]
    info = tarfile.TarInfo({"absolute": "/etc/passwd", "dotdot": "../escape"}.get(kind, "evil"))
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        entries.append((info, None))
    elif kind == "device":
        info.type = tarfile.CHRTYPE
        entries.append((info, None))
    elif kind == "dir":
        info.type = tarfile.DIRTYPE
        entries.append((info, None))
    elif kind == "duplicate":
        entries.append((good, b"abcd"))
    elif kind == "many":
        for i in range(40):
            t = tarfile.TarInfo(f"f{i}")
            t.size = 1
            entries.append((t, b"x"))
    else:
        info.size = 1
        entries.append((info, b"x"))
    p = tmp_path / "evil.bundle"
    _raw_tar(p, entries)
    dest = tmp_path / "out"
    with pytest.raises(BundleError):
        extract_bundle(p, ring, dest)
    assert not dest.exists() and not (tmp_path / "escape").exists()
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".out")] == []


def test_oversized_entry_refused(signed, tmp_path):
    from agent.bundle import Limits

    path, ring, _, _ = signed
    with pytest.raises(BundleError, match="size limit"):
        verify_bundle(path, ring, Limits(max_file_bytes=10))


def test_failed_extract_leaves_nothing(signed, tmp_path):
    path, ring, _, _ = signed
    data = bytearray(path.read_bytes())
    data[bytes(data).index(FILES["model.tflite"]) + 10] ^= 0xFF  # hash mismatch found after extracting
    path.write_bytes(bytes(data))
    dest = tmp_path / "slot"
    with pytest.raises(BundleError):
        extract_bundle(path, ring, dest)
    assert not dest.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".slot")]


def test_manifest_validation_names_the_key(tmp_path):
    k, raw = _key()
    bad = _manifest(arch="sparc")
    with pytest.raises(ManifestError, match=r"manifest.json.arch: unknown arch 'sparc'"):
        write_bundle(tmp_path / "x.bundle", bad, FILES, k.sign, key_id(raw))
    bad = _manifest(format="onnx")
    with pytest.raises(ManifestError, match="cannot run on runtime 'litert'"):
        write_bundle(tmp_path / "x.bundle", bad, FILES, k.sign, key_id(raw))
    bad = _manifest(model={"path": "other.tflite"})
    with pytest.raises(ManifestError, match="not listed in files"):
        write_bundle(tmp_path / "x.bundle", bad, FILES, k.sign, key_id(raw))
    assert not (tmp_path / "x.bundle").exists()


def test_inspect_without_trust(signed):
    path, _, _, raw = signed
    doc, kid = inspect_bundle(path)
    assert doc["name"] == "toy" and kid == key_id(raw)
    assert doc["files"][0]["sha256"] == hashlib.sha256(FILES["golden.npz"]).hexdigest()
    assert json.loads(json.dumps(doc))["schema"] == 1
