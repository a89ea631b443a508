"""Trusted public keys (a keyring) and Ed25519 signature checks.

A keyring is a directory of ``*.pub`` files (or a single file); several keys may be trusted at once so
signing keys can be rotated. A key's id is the first 16 hex digits of SHA-256 over its raw 32 bytes.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from agent.errors import KeyringError, SignatureError

PUBLIC_PREFIX = "edgeship-ed25519 "


def key_id(public_raw: bytes) -> str:
    """Stable short id of a raw 32-byte Ed25519 public key."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def encode_public_key(public_raw: bytes) -> str:
    """The one-line text form of a public key, as written to ``*.pub`` files."""
    return f"{PUBLIC_PREFIX}{base64.b64encode(public_raw).decode()} {key_id(public_raw)}\n"


def decode_public_key(text: str, where: str) -> bytes:
    """Parse a ``*.pub`` file: our one-line form or a PEM SubjectPublicKeyInfo."""
    text = text.strip()
    if text.startswith(PUBLIC_PREFIX):
        parts = text.split()
        try:
            raw = base64.b64decode(parts[1], validate=True)
        except (IndexError, ValueError) as exc:
            raise KeyringError(f"{where}: malformed public key line") from exc
        if len(raw) != 32:
            raise KeyringError(f"{where}: an Ed25519 public key has 32 bytes, got {len(raw)}")
        return raw
    if text.startswith("-----BEGIN PUBLIC KEY-----"):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            key = serialization.load_pem_public_key(text.encode())
        except ValueError as exc:
            raise KeyringError(f"{where}: unreadable PEM public key ({exc})") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise KeyringError(f"{where}: not an Ed25519 public key")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    raise KeyringError(f"{where}: not an edgeship or PEM public key")


@dataclass(frozen=True)
class Keyring:
    """The public keys this device trusts, by key id."""

    keys: dict[str, bytes]

    @classmethod
    def load(cls, path: str | Path) -> "Keyring":
        p = Path(path)
        if p.is_dir():
            files = sorted(p.glob("*.pub"))
        elif p.is_file():
            files = [p]
        else:
            raise KeyringError(f"{p}: keyring not found (a directory of *.pub files or one .pub file)")
        keys = {}
        for f in files:
            raw = decode_public_key(f.read_text(encoding="utf-8", errors="replace"), str(f))
            keys[key_id(raw)] = raw
        if not keys:
            raise KeyringError(f"{p}: keyring holds no *.pub keys")
        return cls(keys)

    @classmethod
    def of(cls, *public_raw: bytes) -> "Keyring":
        return cls({key_id(k): k for k in public_raw})

    def verify(self, kid: str, message: bytes, signature: bytes, where: str) -> None:
        """Raise SignatureError unless ``signature`` over ``message`` is valid for trusted key ``kid``."""
        # cryptography is imported on first use: a serving-only agent process does not pay its memory
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        raw = self.keys.get(kid)
        if raw is None:
            raise SignatureError(f"{where}: signed by key {kid!r}, which this device does not trust "
                                 f"(trusted: {', '.join(sorted(self.keys)) or 'none'})")
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(signature, message)
        except InvalidSignature as exc:
            raise SignatureError(f"{where}: signature does not match the manifest "
                                 f"(key {kid}); the bundle was altered or mis-signed") from exc
