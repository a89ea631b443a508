"""`publish --encrypt` / `rollout start --encrypt`: a sealed copy of a bundle for a set of enrolled devices.

The format is the agent's (agent/seal.py): a fresh data key per sealed bundle, the files encrypted with
AES-256-GCM, the key wrapped for each recipient's model key, and the manifest re-signed over the
ciphertext hashes. The sealed bundle goes to HOME/sealed/; the registry's ``sealed`` table maps it to the
plain bundle it came from, so a rollout can find the plaintext a device patches against (deltas). The data
key lives in memory only, for the deltas of this publish.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.bundle import MANIFEST, SIGNATURE, inspect_bundle, write_bundle
from agent.seal import SEGMENT, Sealing, encrypt_stream, wrap_for
from toolkit.errors import BundleError
from toolkit.signing import SigningKey

SCHEMA = """CREATE TABLE IF NOT EXISTS sealed (sha256 TEXT PRIMARY KEY, plain_path TEXT NOT NULL,
    plain_sha256 TEXT NOT NULL, recipients INTEGER NOT NULL, created REAL NOT NULL)"""


@dataclass(frozen=True)
class Sealed:
    path: Path
    sha256: str
    recipients: int
    manifest: bytes = field(repr=False)  # the sealed bundle's manifest and signature bytes (for sealed deltas)
    signature: bytes = field(repr=False)
    payload: bytes = field(repr=False)  # the plaintext files in manifest order
    data_key: bytes = field(repr=False)  # never written anywhere


def seal_bundle(plain: Path, recipients: dict[str, bytes], key: SigningKey, out_dir: Path) -> Sealed:
    """Seal ``plain`` for ``recipients`` ({model key id: X25519 public key}), signed with ``key``."""
    if not recipients:
        raise BundleError(f"{plain}: nobody to encrypt it for (no enrolled device with a model key there)")
    doc, _ = inspect_bundle(plain)
    if "encryption" in doc:
        raise BundleError(f"{plain} is already encrypted; encrypt the plain bundle it came from")
    files = _files(plain, doc)
    data_key = os.urandom(32)
    nonces = {p: os.urandom(7) for p in files}
    sealing = Sealing(SEGMENT, b"", {p: (nonces[p], len(b)) for p, b in files.items()}, {})
    enc = {**sealing.to_doc(), **wrap_for(recipients, data_key)}
    sealed_files = {p: encrypt_stream(b, data_key, nonces[p], p.encode()) for p, b in files.items()}
    body = {k: v for k, v in doc.items() if k not in ("files", "key_id", "schema")}
    body["encryption"] = enc
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{plain.stem}.{os.getpid()}.sealing"
    write_bundle(tmp, body, sealed_files, key.sign, key.key_id)
    data = tmp.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    path = out_dir / f"{plain.stem}-sealed-{sha[:12]}.bundle"
    os.replace(tmp, path)
    with tarfile.open(path) as tar:
        manifest, signature = (tar.extractfile(n).read() for n in (MANIFEST, SIGNATURE))  # type: ignore[union-attr]
    payload = b"".join(files[p] for p in sorted(files))
    return Sealed(path, sha, len(recipients), manifest, signature, payload, data_key)


def _files(bundle: Path, doc: dict) -> dict[str, bytes]:
    """The bundle's files, each checked against its manifest hash."""
    out = {}
    try:
        with tarfile.open(bundle) as tar:
            for f in doc["files"]:
                fh = tar.extractfile(f["path"])
                data = fh.read() if fh else b""
                if hashlib.sha256(data).hexdigest() != f["sha256"]:
                    raise BundleError(f"{bundle}:{f['path']}: does not match its manifest hash")
                out[f["path"]] = data
    except (tarfile.TarError, KeyError, OSError) as exc:
        raise BundleError(f"{bundle}: cannot read its files ({exc})") from exc
    return out


def record(registry: Path, sealed: Sealed, plain: Path) -> None:
    db = sqlite3.connect(str(registry), timeout=30)
    try:
        with db:
            db.execute(SCHEMA)
            db.execute("INSERT OR REPLACE INTO sealed VALUES (?,?,?,?,?)",
                       (sealed.sha256, str(plain.resolve()), hashlib.sha256(plain.read_bytes()).hexdigest(),
                        sealed.recipients, time.time()))
    finally:
        db.close()


def plain_paths(db: sqlite3.Connection, shas: set[str]) -> list[Path]:
    """The plain bundles that the sealed bundles ``shas`` came from (what their devices patch against)."""
    if not shas:
        return []
    try:
        rows = db.execute(f"SELECT plain_path FROM sealed WHERE sha256 IN ({','.join('?' * len(shas))})",
                          sorted(shas)).fetchall()
    except sqlite3.Error:
        return []  # nothing was ever sealed with this registry
    return [Path(p) for (p,) in rows if Path(p).is_file()]
