"""What `edgeship-agent status` reports. With a running agent: what it serves (asked over the control
channel). Without one: what the state dir says a start would serve, read without recovering or writing
anything (an interrupted update is reported as pending recovery, not recovered).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import AgentError
from agent.manifest import parse_manifest
from agent.store import Store

if TYPE_CHECKING:
    from agent.serve.service import Agent


def report(state_dir: Path, agent: "Agent | None" = None) -> dict[str, Any]:
    from agent.fleet.desired import state_summary
    from agent.fleet.reporter import OUTBOX_FILE

    state_dir = Path(state_dir)
    if agent is not None:
        doc = agent.status()
        doc["agent"] = {"running": True, "pid": os.getpid()}
    else:
        doc = _from_state_dir(state_dir)
        doc["agent"] = {"running": False}
    if (fleet := state_summary(state_dir)) is not None:
        doc["fleet"] = fleet
    if (queue := _queue(state_dir / OUTBOX_FILE)) is not None:
        doc["telemetry_queue"] = queue
    from agent.capture.recorder import CAPTURE_FILE, LABELS_FILE

    if agent is not None and agent.capture is not None:
        doc["capture"] = agent.capture.status()
    elif (queue := _queue(state_dir / CAPTURE_FILE)) is not None:  # the queues of a capture that is not running
        doc["capture"] = {"queued": queue.get("records"), "dropped": queue.get("dropped"),
                          "labels_queued": (_queue(state_dir / LABELS_FILE) or {}).get("records")}
    return doc


def _from_state_dir(state_dir: Path) -> dict[str, Any]:
    store = Store(state_dir, create=False)
    st = store.load()
    active, upd = st.get("active"), st.get("update")
    doc: dict[str, Any] = {"active": active, "previous": st.get("previous"), "model": None, "version": None,
                           "installed_sha256": store.bundle_sha256(active), "update": upd,
                           "last_update": st.get("last_update")}
    if upd:
        doc["recovery_pending"] = f"an update was interrupted in {upd.get('state')}; the next start recovers it"
    if active:
        try:
            m = parse_manifest((store.slot(active) / "manifest.json").read_bytes())
            doc["model"], doc["version"] = m.name, m.version
        except (OSError, AgentError) as exc:
            doc["error"] = f"active slot {active}: unreadable manifest ({exc})"
    return doc


def _queue(path: Path) -> dict[str, Any] | None:
    """Records waiting in the telemetry outbox, read through a read-only connection."""
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            n = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            row = db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
        finally:
            db.close()
    except sqlite3.Error as exc:
        return {"error": f"{path}: {exc}"}
    return {"records": int(n), "dropped": int(row[0]) if row else 0}
