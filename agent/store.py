"""Durable agent state: one JSON document written atomically (temp file, fsync, rename, fsync dir).

It holds the active and previous slots and, while an update runs, the update's persisted state.
The "installed model" record and the next state are always written together in one write.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from agent.errors import StateError

STATE_FILE = "state.json"


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Write-then-rename: readers see the old or the new file, never a mix. ``durable=False`` skips the
    fsyncs, for files whose content is checked by hash when read back (download chunks)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "slots").mkdir(exist_ok=True)
        self.path = self.dir / STATE_FILE

    def load(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"active": None, "previous": None, "update": None, "events": []}
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise StateError(f"{self.path}: unreadable agent state ({exc}); restore it or remove it "
                             f"to start empty") from exc

    def save(self, doc: dict[str, Any]) -> None:
        doc["events"] = doc.get("events", [])[-50:]
        atomic_write(self.path, json.dumps(doc, indent=1, sort_keys=True).encode())

    def slot(self, name: str) -> Path:
        return self.dir / "slots" / name
