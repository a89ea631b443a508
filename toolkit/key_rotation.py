"""Signing keys that can change: the root key, and the keyring documents it signs.

The **root key** (Ed25519, ``root.pem`` + ``root.pub``) is made once, on a machine that stays offline; only
its public half goes to the host (``HOME/root.pub``) and to every device. The root signs **keyring
documents** (``agent.fleet.protocol.keyring_doc``): the signing keys devices trust, a version that only
grows, an expiry, and the key ids it revoked. The host keeps the newest one in ``HOME/keys/keyring.json``,
publishes it retained on each fleet's keyring topic, and writes it into every device folder.

Without the root key on the host, ``rotate`` and ``revoke`` write an unsigned **request**
(``HOME/keys/keyring-request.json``) to carry to the root's machine: ``edgeship keys sign-keyring REQUEST
--root-key root.pem -o keyring.json`` signs it there, ``edgeship keys publish-keyring keyring.json`` installs
and publishes it here.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from agent.errors import ProtocolError
from agent.fleet.protocol import KeyringDoc, keyring_doc, keyring_topic, parse_keyring, sign_message
from agent.keys import Keyring, key_id
from agent.store import atomic_write
from toolkit.errors import TrustError
from toolkit.settings import Settings
from toolkit.signing import SigningKey, generate_key

EXPIRES_DAYS = 365.0


def root_pub(s: Settings) -> Path:
    return s.home / "root.pub"


def keyring_path(s: Settings) -> Path:
    return s.keyring_path / "keyring.json"


def request_path(s: Settings) -> Path:
    return s.keyring_path / "keyring-request.json"


def root_init(s: Settings, out: Path) -> SigningKey:
    """A new root key in ``out`` (root.pem 0600, root.pub); its public half also goes to HOME/root.pub."""
    if root_pub(s).exists():
        raise TrustError(f"{root_pub(s)}: this host already trusts a root key; a new root means re-provisioning "
                         f"every device")
    key = generate_key(Path(out) / "root.pem")
    s.home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(key.path.with_suffix(".pub"), root_pub(s))
    return key


def root_keyring(s: Settings) -> Keyring:
    if not root_pub(s).is_file():
        raise TrustError(f"{root_pub(s)}: no root key here (edgeship keys root-init, on an offline machine; then "
                         f"copy its root.pub there)")
    return Keyring.load(root_pub(s))


def current(s: Settings) -> tuple[KeyringDoc, bytes] | None:
    """The newest keyring document this host holds (checked against HOME/root.pub), or None."""
    path = keyring_path(s)
    if not path.is_file():
        return None
    raw = path.read_bytes()
    try:
        return parse_keyring(raw, str(path), root_keyring(s)), raw
    except ProtocolError as exc:
        raise TrustError(f"{path}: {exc}") from exc


def trusted(s: Settings) -> Keyring:
    """What this host's devices trust: the keyring document's keys, else the plain keyring in HOME/keys."""
    cur = current(s)
    return Keyring(cur[0].keys) if cur else Keyring.load(s.keyring_path)


def request(s: Settings, add: list[bytes] = (), revoke: list[str] = (),
            expires_days: float = EXPIRES_DAYS) -> dict[str, Any]:
    """The next keyring (unsigned): the current one (or, before the first, the keys in HOME/keys) plus
    ``add``, minus ``revoke``, one version up."""
    cur = current(s)
    keys = dict(cur[0].keys) if cur else dict(Keyring.load(s.keyring_path).keys)
    keys.update({key_id(k): k for k in add})
    revoked = set(cur[0].revoked if cur else ()) | set(revoke)
    missing = set(revoke) - set(keys)
    if missing:
        raise TrustError(f"key {sorted(missing)[0]} is not in the keyring (keys: {', '.join(sorted(keys))})")
    for kid in revoked:
        keys.pop(kid, None)
    if not keys:
        raise TrustError("the keyring would trust no key at all; rotate first (edgeship keys rotate)")
    return keyring_doc((cur[0].version if cur else 0) + 1, keys, time.time() + expires_days * 86400,
                       sorted(revoked))


def sign(req: dict[str, Any], root: SigningKey) -> bytes:
    """A request signed by the root key: the keyring document devices accept."""
    payload = sign_message(req, root.key_id, root.sign)
    try:
        parse_keyring(payload, "keyring", Keyring.of(root.public_raw))
    except ProtocolError as exc:
        raise TrustError(f"not a keyring request: {exc}") from exc
    return payload


def install(s: Settings, payload: bytes) -> KeyringDoc:
    """Make a signed keyring this host's current one (it must be the root's and newer)."""
    try:
        doc = parse_keyring(payload, "keyring", root_keyring(s))
    except ProtocolError as exc:
        raise TrustError(f"{exc} (is it signed by the root whose root.pub is in {s.home}?)") from exc
    cur = current(s)
    if cur and doc.version <= cur[0].version and payload != cur[1]:
        raise TrustError(f"keyring v{doc.version} is not newer than the current v{cur[0].version}")
    atomic_write(keyring_path(s), payload, public=True)  # public: it goes to every device
    request_path(s).unlink(missing_ok=True)
    _activate(s, doc)
    return doc


def rotate(s: Settings, expires_days: float = EXPIRES_DAYS) -> tuple[SigningKey, dict[str, Any]]:
    """A new signing key, waiting in HOME/keys/next/ until a keyring that trusts it is installed (then it
    becomes HOME/keys/signing.pem and the old one moves to HOME/keys/retired/, trusted until revoked), and
    the keyring request that trusts both."""
    from toolkit.signing import load_key

    nxt = s.keyring_path / "next" / "signing.pem"
    if nxt.exists():
        raise TrustError(f"{nxt}: a rotation is pending; sign and publish its keyring first "
                         f"(edgeship keys sign-keyring {request_path(s)} ...; edgeship keys publish-keyring)")
    keep = [load_key(s.key_path).public_raw] if s.key_path.exists() else []  # trusted until revoked
    new = generate_key(nxt)
    return new, request(s, add=[*keep, new.public_raw], expires_days=expires_days)


def _activate(s: Settings, doc: KeyringDoc) -> SigningKey | None:
    """When the installed keyring trusts the pending key: make it the signing key, retire the old one."""
    from agent.store import fsync_dir
    from toolkit.signing import load_key

    nxt = s.keyring_path / "next" / "signing.pem"
    if not nxt.exists() or load_key(nxt).key_id not in doc.keys:
        return None
    retired = s.keyring_path / "retired"
    if s.key_path.exists():
        kid = load_key(s.key_path).key_id
        retired.mkdir(mode=0o700, exist_ok=True)
        for src in (s.key_path, s.key_path.with_suffix(".pub")):
            if src.exists():
                src.rename(retired / f"signing-{kid}{src.suffix}")
        fsync_dir(retired)
    nxt.with_suffix(".pub").rename(s.key_path.with_suffix(".pub"))
    nxt.rename(s.key_path)
    fsync_dir(s.keyring_path)
    return load_key(s.key_path)


def save_request(s: Settings, req: dict[str, Any]) -> Path:
    atomic_write(request_path(s), json.dumps(req, indent=2, sort_keys=True).encode(), public=True)
    return request_path(s)


def load_request(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TrustError(f"{path}: not a keyring request ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("type") != "keyring":
        raise TrustError(f"{path}: not a keyring request")
    return doc


def publish(payload: bytes, broker: Any, fleet: str, timeout: float = 30.0) -> str:
    """Retain a signed keyring on ``fleet``'s keyring topic; returns the topic."""
    from toolkit.fleet.publish import retain_once

    topic = keyring_topic(fleet)
    retain_once(broker, topic, payload, "the keyring", TrustError, timeout)
    return topic


def describe(doc: KeyringDoc) -> str:
    return (f"keyring v{doc.version}: trusts {', '.join(sorted(doc.keys))}"
            + (f"; revoked {', '.join(doc.revoked)}" if doc.revoked else "")
            + f"; expires {time.strftime('%Y-%m-%d', time.localtime(doc.expires))}")
