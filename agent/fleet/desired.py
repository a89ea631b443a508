"""The device's fleet state (``fleet.json`` in the state dir) and the desired-state policy: which desired
states are accepted, which are stale or already handled, and when the device gives up on one.

Pure functions over the state document; the link persists it and acts on the answers.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from agent.errors import ProtocolError
from agent.fleet.protocol import Desired, parse_desired
from agent.keys import Keyring
from agent.store import atomic_write

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3  # installs of one desired state that may kill the agent before it gives up
MAX_TOPICS = 8  # desired-state topics whose last seq is remembered (the device's own and its groups')
STATE_FILE = "fleet.json"  # in the state dir: last desired state, its seq, installed bundle, attempts


def load_state(state_dir: Path) -> dict[str, Any]:
    """The fleet state; an unreadable one (damaged, not an object) starts over, saying so: the device then
    follows the retained desired state again and reports what it serves."""
    path = state_dir / STATE_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        doc = None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        log.warning("%s is unreadable (%s); starting from an empty fleet state", path, type(exc).__name__)
        doc = None
    else:
        if not isinstance(doc, dict) or not isinstance(doc.get("desired") or {}, dict):
            log.warning("%s does not hold a fleet state; starting from an empty one", path)
            doc = None
    return doc if doc is not None else {"seq": 0, "installed_sha256": None}


def save_state(state_dir: Path, doc: dict[str, Any]) -> None:
    atomic_write(state_dir / STATE_FILE, json.dumps(doc).encode())


def failure(st: dict[str, Any]) -> str | None:
    """Why the device gave up on its current desired state (None: it has not)."""
    desired = st.get("desired")
    return st.get("error", "") if desired and st.get("failed_seq") == desired.get("seq") else None


def state_summary(state_dir: Path) -> dict[str, Any] | None:
    """The fleet state for `edgeship-agent status` (None: this device never followed a fleet)."""
    if not (state_dir / STATE_FILE).exists():
        return None
    st = load_state(state_dir)
    desired = st.get("desired")
    return {"desired": {k: desired.get(k) for k in ("model", "version", "bundle_sha256", "target")} if desired
            else None, "installed_sha256": st.get("installed_sha256"), "error": failure(st)}


def accept(st: dict[str, Any], topic: str, payload: bytes, keyring: Keyring, device: str,
           group: str, require_expiry: bool = False) -> tuple[Desired, dict[str, Any]] | None:
    """Check a desired-state message and record it in ``st`` (the caller saves it). None: the same message
    again, a refresh of it (its later expiry is recorded), or superseded by the other desired topic.
    ProtocolError: not signed by a trusted key, not for this device, expired (or, with ``require_expiry``,
    without an expiry), or stale (older than what this topic already said: a replay, or a broker restoring
    old state)."""
    d, doc = parse_desired(payload, topic, keyring)
    if d.target not in (f"device:{device}", f"group:{group}"):
        raise ProtocolError(f"{topic}: desired state for {d.target!r}, not for this device")
    if d.expires is None and require_expiry:
        raise ProtocolError(f"{topic}: desired state {d.model} v{d.version} has no expiry: ignored (publish "
                            f"it with an edgeship that sets one)")
    if d.expires is not None and d.expires < time.time():
        raise ProtocolError(f"{topic}: desired state {d.model} v{d.version} expired at {_utc(d.expires)}: "
                            f"ignored (the host renews desired states: edgeship fleet refresh)")
    seen = st.setdefault("topic_seq", {}).get(topic, 0)
    if d.seq < seen:
        raise ProtocolError(f"{topic}: stale desired state {d.model} v{d.version} (seq {d.seq} < {seen}) ignored")
    held = st.get("desired") or {}
    if d.seq == seen and held.get("seq") == d.seq and d.expires and _same(held, doc):
        held["expires"] = max(d.expires, held.get("expires") or 0)  # a refresh: the same state, renewed
        return None
    if d.seq <= st.get("seq", 0):
        log.info("desired state %s v%d already handled or superseded", d.model, d.version)
        return None
    st["seq"] = st["topic_seq"][topic] = d.seq
    if len(st["topic_seq"]) > MAX_TOPICS:  # a history of every group ever joined: keep the newest
        st["topic_seq"] = dict(sorted(st["topic_seq"].items(), key=lambda kv: kv[1])[-MAX_TOPICS:])
    st["desired"] = doc
    return d, doc


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same desired state, whatever its expiry and signature (a refresh may be signed by a newer key)."""
    def strip(doc: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in doc.items() if k not in ("expires", "sig", "key_id")}
    return strip(a) == strip(b)


def expired(st: dict[str, Any], now: float | None = None) -> str:
    """Why the desired state this device follows is stale ('' when it is not): its expiry passed and the
    host did not renew it (the host is down, or someone withholds newer states: a freeze attack)."""
    doc = st.get("desired") or {}
    exp = doc.get("expires")
    if not exp or (now or time.time()) <= exp:
        return ""
    return (f"desired state {doc.get('model')} v{doc.get('version')} expired at {_utc(exp)} and was not renewed; "
            f"still serving what is installed")


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def pending(st: dict[str, Any]) -> Desired | None:
    """The desired state this device has not reached yet and has not given up on (after a restart)."""
    doc = st.get("desired")
    if not doc or st.get("installed_sha256") == doc.get("bundle_sha256") or failure(st) is not None:
        return None
    return Desired.from_doc(doc, STATE_FILE)


def gave_up(st: dict[str, Any], d: Desired) -> str | None:
    """After the agent died during the install of ``d`` MAX_ATTEMPTS times: record and return why it gives
    up (a new desired state, even for the same bundle, starts over)."""
    tries = st.get("attempts") or {}
    if tries.get("seq") != d.seq or tries.get("n", 0) < MAX_ATTEMPTS:
        return None
    error = f"gave up on {d.model} v{d.version}: the agent stopped during its install {tries['n']} times"
    st["failed_seq"], st["error"] = d.seq, error
    return error


def count_attempt(st: dict[str, Any], d: Desired) -> None:
    """Before the engine runs: an install that kills the process is counted."""
    tries = st.get("attempts") or {}
    st["attempts"] = {"seq": d.seq, "n": tries.get("n", 0) + 1 if tries.get("seq") == d.seq else 1}
