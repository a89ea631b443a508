"""What a device trusts to sign bundles and desired states, and how that changes.

Two ways to provision a device:

- a **plain keyring** (a folder of ``*.pub`` files, ``agent.keys.Keyring``): fixed until someone copies
  other files onto the device — how devices were provisioned before keys could rotate; still works;
- a **root key** (``[agent] root_key``, the root's public key, whose private half is kept offline) and a
  **keyring document** it signed (``protocol.keyring_doc``: the trusted signing keys, a version, an expiry,
  the revoked key ids). ``Trust`` holds the newest document it has accepted: the provisioned one, the copy
  in the state dir, or one that arrives over MQTT (``offer``) — taken only when the root signed it, its
  version is higher than the one held, and it has not expired. It is saved in the state dir (atomically)
  before it is used, so a restart never falls back to an older keyring.

``Trust`` verifies like a Keyring (``keys``, ``verify``), so the install engine and the fleet link use it
unchanged: from the moment a keyring without a key is accepted, bundles and desired states that key signed
are refused, with the reason (revoked, or not in keyring vN, or the keyring expired).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from agent.errors import KeyringError, ProtocolError, SignatureError, TrustError
from agent.fleet.protocol import KeyringDoc, parse_keyring
from agent.keys import Keyring
from agent.store import atomic_write

log = logging.getLogger(__name__)
STATE_FILE = "keyring.json"  # in the state dir: the newest keyring document accepted


class Trust:
    """The signing keys the fleet's root currently trusts (the newest keyring document accepted)."""

    def __init__(self, root: Keyring, doc: KeyringDoc, raw: bytes, state_dir: Path | None = None,
                 clock: Any = time.time):
        self.root, self.state_dir, self.clock = root, state_dir, clock
        self._lock = threading.Lock()
        self.doc, self.raw = doc, raw

    # ------------------------------------------------------------ Keyring's interface
    @property
    def keys(self) -> dict[str, bytes]:
        return self.doc.keys

    def verify(self, kid: str, message: bytes, signature: bytes, where: str) -> None:
        """As Keyring.verify, against the keyring held now; a revoked key and an expired keyring say so."""
        doc = self.doc
        if kid in doc.revoked:
            raise SignatureError(f"{where}: signed by key {kid}, which the fleet's root revoked (keyring "
                                 f"v{doc.version}); sign with a current key")
        if doc.expires and self.clock() > doc.expires:
            raise SignatureError(f"{where}: the keyring (v{doc.version}) expired at {_utc(doc.expires)}; this "
                                 f"device accepts updates again once the fleet publishes a newer keyring")
        Keyring(doc.keys).verify(kid, message, signature, f"{where} (keyring v{doc.version})")

    # ------------------------------------------------------------ updates
    def offer(self, payload: bytes, topic: str) -> KeyringDoc | None:
        """A keyring document from the fleet. Returns it when accepted (saved first), None when it is the one
        held already; ProtocolError when it is not the root's, older than the one held, or expired."""
        try:
            doc = parse_keyring(payload, topic, self.root)
        except ProtocolError as exc:
            if "does not trust" in str(exc):
                raise ProtocolError(f"{topic}: keyring not signed by this device's root key "
                                    f"({', '.join(self.root.keys)})") from exc
            raise
        with self._lock:
            held = self.doc
            if doc.version == held.version and payload == self.raw:
                return None
            if doc.version <= held.version:
                raise ProtocolError(f"{topic}: keyring v{doc.version} is not newer than the one trusted "
                                    f"(v{held.version}): ignored (a replay, or a broker restoring old state)")
            if self.clock() > doc.expires:
                raise ProtocolError(f"{topic}: keyring v{doc.version} expired at {_utc(doc.expires)}: ignored")
            if self.state_dir is not None:
                atomic_write(self.state_dir / STATE_FILE, payload)  # before it is used: a restart keeps it
            self.doc, self.raw = doc, payload
        log.info("keyring v%d accepted: trusts %s%s", doc.version, ", ".join(sorted(doc.keys)),
                 f"; revoked {', '.join(doc.revoked)}" if doc.revoked else "")
        return doc

    def status(self) -> dict[str, Any]:
        d = self.doc
        return {"version": d.version, "expires": d.expires or None, "keys": sorted(d.keys),
                "revoked": list(d.revoked), "expired": bool(d.expires and self.clock() > d.expires)}


def load_trust(keyring: Path, root_key: Path | None = None, state_dir: Path | None = None) -> "Keyring | Trust":
    """What the device trusts at start: without a root key, the plain keyring at ``keyring``; with one, the
    newest of the provisioned keyring document (``keyring``: a keyring.json, or a folder holding one — else
    its ``*.pub`` files count as version 0) and the one saved in ``state_dir``."""
    keyring = Path(keyring)
    if root_key is None:
        return Keyring.load(keyring)
    root = Keyring.load(root_key)
    if len(root.keys) != 1:
        raise KeyringError(f"{root_key}: a root key file holds exactly one public key")
    doc_file = keyring / STATE_FILE if keyring.is_dir() else keyring
    if doc_file.is_file() and doc_file.suffix == ".json":
        raw = doc_file.read_bytes()
        try:
            best = (parse_keyring(raw, str(doc_file), root), raw)
        except ProtocolError as exc:
            raise TrustError(f"{doc_file}: not a keyring document signed by the root key in {root_key} "
                             f"({exc})") from exc
    else:  # a folder of *.pub: trusted until the first keyring document arrives
        best = (KeyringDoc(0, 0.0, Keyring.load(keyring).keys, ()), b"")
    saved = Path(state_dir) / STATE_FILE if state_dir is not None else None
    if saved is not None and saved.is_file():
        raw = saved.read_bytes()
        try:
            doc = parse_keyring(raw, str(saved), root)
            if doc.version > best[0].version:
                best = (doc, raw)
        except ProtocolError as exc:  # not the root's: never trusted, never fatal
            log.warning("ignoring %s: %s", saved, exc)
    return Trust(root, best[0], best[1], Path(state_dir) if state_dir is not None else None)


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
