"""Ed25519 signing keys on the host. Verification lives in ``agent.keys`` (the device side).

Private keys are written as PKCS#8 PEM into a file only this process created (O_CREAT|O_EXCL|O_NOFOLLOW
under a random name, so neither a leftover file nor a planted symlink can receive them), forced to mode
0600, checked, then renamed into place; the matching ``.pub`` is the one-line edgeship format the agent's
keyring reads. Key material is never logged.
"""

from __future__ import annotations

import os
import secrets
import stat
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
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    write_private(path, pem)
    from agent.store import atomic_write

    atomic_write(pub, encode_public_key(raw).encode())  # rename over whatever is there, links included
    return SigningKey(key, raw, path)


def write_private(path: Path, pem: bytes) -> None:
    """A secret (a private key) into ``path``: a file only we created, 0600, then renamed into place."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SigningKeyError(f"{tmp}: cannot create the private key file ({exc})") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)  # whatever the umask said
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
            st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != 0o600 or st.st_uid != os.getuid():
            raise SigningKeyError(f"{tmp}: the private key file is not a 0600 file of this user")
        os.replace(tmp, path)  # replaces a link at ``path`` itself, never its target
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != 0o600 or path.read_bytes() != pem:
        raise SigningKeyError(f"{path}: the private key did not land as a 0600 file; check the folder")


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
