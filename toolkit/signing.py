"""Ed25519 signing keys on the host. Verification lives in ``agent.keys`` (the device side).

Private keys are written with mode 0600 as PKCS#8 PEM; the matching ``.pub`` is the one-line
edgeship format the agent's keyring reads. Key material is never logged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.keys import encode_public_key, key_id
from toolkit.errors import SigningKeyError


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey
    public_raw: bytes
    path: Path

    @property
    def key_id(self) -> str:
        return key_id(self.public_raw)

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)


def generate_key(path: str | Path, force: bool = False) -> SigningKey:
    path = Path(path)
    pub = path.with_suffix(".pub")
    if (path.exists() or pub.exists()) and not force:
        raise SigningKeyError(f"{path}: a key already exists (use --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.replace(tmp, path)
    pub.write_text(encode_public_key(raw), encoding="utf-8")
    return SigningKey(key, raw, path)


def load_key(path: str | Path) -> SigningKey:
    path = Path(path)
    if not path.is_file():
        raise SigningKeyError(f"{path}: signing key not found; create one with `edgeship keys generate`")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path}: not an Ed25519 key")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return SigningKey(key, raw, path)


def load_or_create(path: Path) -> SigningKey:
    return load_key(path) if path.exists() else generate_key(path)
