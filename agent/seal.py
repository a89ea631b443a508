"""Encrypted bundles: the model and golden set readable only by the devices a bundle was sealed for.

A sealed bundle (manifest schema 2, docs/bundle.md) is an ordinary signed bundle whose file entries hold
ciphertext; the manifest's ``files`` list the ciphertext hashes, so the signature and every hash are checked
before any decryption, exactly as for a plain bundle. Its ``encryption`` block says how to open them:

- one fresh 256-bit **data key** per bundle; each file is encrypted with AES-256-GCM in segments of
  ``segment`` bytes (the STREAM construction: nonce = the file's 7-byte prefix, the segment number (4 bytes)
  and a last-segment flag; the file name is the associated data), so decryption streams with bounded
  memory and any change, reordering or truncation fails;
- the data key is **wrapped** for each recipient: an X25519 key agreement between a per-bundle ephemeral
  key (``epk``) and the device's model key (made at enrollment), HKDF-SHA256, AES-256-GCM. A recipient is
  named by its key id (first 16 hex of the SHA-256 of its public key).

The host seals (toolkit/fleet/sealing.py); the device opens (``Opener``) while staging a slot.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from agent.errors import ManifestError, SealError

AEAD = "aes-256-gcm"
SEGMENT = 64 * 1024
TAG = 16
MAX_RECIPIENTS = 10_000
_INFO = b"edgeship-seal-v1"


def model_key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


# ---------------------------------------------------------------- keys
def generate_model_key() -> tuple[bytes, bytes]:
    """A device's model key: (private PKCS#8 PEM, raw 32-byte public key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    key = X25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return pem, key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _kek(shared: bytes, epk: bytes, recipient: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(hashes.SHA256(), 32, salt=None, info=_INFO + epk + recipient).derive(shared)


def wrap_for(recipients: dict[str, bytes], data_key: bytes) -> dict[str, Any]:
    """``recipients``: {model key id: raw X25519 public key} -> the ``epk`` and ``recipients`` fields."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    eph = X25519PrivateKey.generate()
    epk = eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    out = []
    for kid, pub in sorted(recipients.items()):
        kek = _kek(eph.exchange(X25519PublicKey.from_public_bytes(pub)), epk, pub)
        nonce = os.urandom(12)
        out.append({"kid": kid, "wrapped": _b64(nonce + AESGCM(kek).encrypt(nonce, data_key, kid.encode()))})
    return {"epk": _b64(epk), "recipients": out}


# ---------------------------------------------------------------- segments
def _nonce(prefix: bytes, i: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", i, 1 if last else 0)


def encrypt_stream(data: bytes, key: bytes, prefix: bytes, aad: bytes, segment: int = SEGMENT) -> bytes:
    """``data`` sealed segment by segment (an empty file is one empty last segment)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aes = AESGCM(key)
    n = max(1, -(-len(data) // segment))
    return b"".join(aes.encrypt(_nonce(prefix, i, i == n - 1), data[i * segment:(i + 1) * segment], aad)
                    for i in range(n))


def sealed_size(size: int, segment: int = SEGMENT) -> int:
    return size + TAG * max(1, -(-size // segment))


def decrypt_stream(src: BinaryIO, size: int, key: bytes, prefix: bytes, aad: bytes, segment: int,
                   where: str) -> Iterator[bytes]:
    """The plaintext of a sealed file of ``size`` plaintext bytes, segment by segment."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aes = AESGCM(key)
    n = max(1, -(-size // segment))
    for i in range(n):
        want = min(segment, size - i * segment) + TAG
        ct = src.read(want)
        if len(ct) != want:
            raise SealError(f"{where}: ciphertext ends early (segment {i} of {n})")
        try:
            yield aes.decrypt(_nonce(prefix, i, i == n - 1), ct, aad)
        except InvalidTag as exc:
            raise SealError(f"{where}: segment {i} does not decrypt (wrong key or altered data)") from exc
    if src.read(1):
        raise SealError(f"{where}: data after the last segment")


# ---------------------------------------------------------------- the manifest block
@dataclass(frozen=True)
class Sealing:
    """A sealed manifest's ``encryption`` block, checked."""

    segment: int
    epk: bytes
    files: dict[str, tuple[bytes, int]]  # path -> (nonce prefix, plaintext size)
    recipients: dict[str, bytes]  # model key id -> wrapped data key (nonce + ciphertext)

    @classmethod
    def of(cls, manifest: Any) -> "Sealing | None":
        """The block of a manifest (None for a plain bundle); ManifestError when it is malformed."""
        data = manifest.data if hasattr(manifest, "data") else manifest
        enc = data.get("encryption")
        if enc is None:
            return None
        where = "manifest.json.encryption"
        try:
            if enc["aead"] != AEAD:
                raise ManifestError(f"{where}.aead: {enc['aead']!r} is not supported (only {AEAD})")
            segment = enc["segment"]
            if type(segment) is not int or not 4096 <= segment <= 1 << 24:
                raise ManifestError(f"{where}.segment: expected an integer in [4096, 16 MiB]")
            files = {}
            for path, f in enc["files"].items():
                prefix, size = _unb64(f["nonce"]), f["size"]
                if len(prefix) != 7 or type(size) is not int or size < 0:
                    raise ManifestError(f"{where}.files.{path}: needs a 7-byte nonce and a size >= 0")
                files[path] = (prefix, size)
            rec = enc["recipients"]
            if not isinstance(rec, list) or not 0 < len(rec) <= MAX_RECIPIENTS:
                raise ManifestError(f"{where}.recipients: 1 to {MAX_RECIPIENTS} entries")
            recipients = {r["kid"]: _unb64(r["wrapped"]) for r in rec}
            epk = _unb64(enc["epk"])
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ManifestError(f"{where}: malformed ({type(exc).__name__}: {exc})") from exc
        if len(epk) != 32 or any(len(w) != 12 + 32 + TAG for w in recipients.values()):
            raise ManifestError(f"{where}: malformed ephemeral key or wrapped key")
        return cls(segment, epk, files, recipients)

    def to_doc(self) -> dict[str, Any]:
        return {"aead": AEAD, "segment": self.segment, "epk": _b64(self.epk),
                "files": {p: {"nonce": _b64(n), "size": s} for p, (n, s) in sorted(self.files.items())},
                "recipients": [{"kid": k, "wrapped": _b64(w)} for k, w in sorted(self.recipients.items())]}


class Opener:
    """This device's model key: opens bundles sealed for it."""

    def __init__(self, private_pem: bytes, where: str):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        try:
            key = serialization.load_pem_private_key(private_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise SealError(f"{where}: not an unencrypted PEM private key ({exc})") from exc
        if not isinstance(key, X25519PrivateKey):
            raise SealError(f"{where}: a model key is an X25519 key")
        self._key = key
        self.public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = model_key_id(self.public)

    @classmethod
    def load(cls, path: Path) -> "Opener":
        try:
            return cls(Path(path).read_bytes(), str(path))
        except OSError as exc:
            raise SealError(f"{path}: cannot read the model key ({exc.strerror})") from exc

    def data_key(self, s: Sealing, where: str) -> bytes:
        """Unwrap the bundle's data key; SealError when the bundle was not sealed for this device."""
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        wrapped = s.recipients.get(self.key_id)
        if wrapped is None:
            raise SealError(f"{where}: encrypted for {len(s.recipients)} device(s), not for this one (model key "
                            f"{self.key_id}); publish it for this device's group, or re-enroll it")
        kek = _kek(self._key.exchange(X25519PublicKey.from_public_bytes(s.epk)), s.epk, self.public)
        try:
            return AESGCM(kek).decrypt(wrapped[:12], wrapped[12:], self.key_id.encode())
        except InvalidTag as exc:
            raise SealError(f"{where}: the data key wrapped for {self.key_id} does not open with this "
                            f"device's model key") from exc

    def open_folder(self, folder: Path, manifest: Any, where: str) -> None:
        """Decrypt the sealed files in ``folder`` in place (each through a 0600 temp file + rename). Called
        only after the signature and every ciphertext hash were checked."""
        s = Sealing.of(manifest)
        assert s is not None
        key = self.data_key(s, where)
        for path, (prefix, size) in s.files.items():
            src, tmp = folder / path, folder / f".{path}.plain"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with open(src, "rb") as fin, os.fdopen(fd, "wb") as out:
                for part in decrypt_stream(fin, size, key, prefix, path.encode(), s.segment, f"{where}:{path}"):
                    out.write(part)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, src)


def load_opener(path: Path | None) -> Opener | None:
    return Opener.load(path) if path is not None else None


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: Any) -> bytes:
    if not isinstance(s, str):
        raise ValueError("expected a base64 string")
    return base64.b64decode(s, validate=True)
