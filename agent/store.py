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


def atomic_write(path: Path, data: bytes, durable: bool = True, public: bool = False) -> None:
    """Write-then-rename: readers see the old or the new file, never a mix. ``durable=False`` skips the
    fsyncs, for files whose content is checked by hash when read back (download chunks). The file is
    private (0600) unless ``public``: then it gets the mode a plain ``open`` would give (0666 & ~umask),
    for what is not a secret (bundles, reports)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        if public:
            os.fchmod(fd, 0o666 & ~_umask())
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


def _umask() -> int:
    try:  # Linux >= 4.7 shows it without changing it
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
