"""Durable agent state: one JSON document written atomically (temp file, fsync, rename, fsync dir).

It holds the active and previous slots (with the SHA-256 of the bundle each came from), the
anti-rollback floor per model name and, while an update runs, the update's persisted state. The
"installed model" record and the next state are always written together in one write.

Nothing grows without bound: the event history is capped, and ``sweep`` (run by the state dir's owner at
start-up) removes what a killed process leaves behind: write-then-rename temp files and half-extracted slots.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from agent.errors import StateError

log = logging.getLogger(__name__)
STATE_FILE = "state.json"
MAX_EVENTS = 50
_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}$")  # tempfile.mkstemp/mkdtemp names: ".<target name>.<8 random>"


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


def is_temp(name: str) -> bool:
    """A leftover of atomic_write / extract_bundle (a process killed between create and rename)."""
    return bool(_TEMP.match(name))


def sweep_temp(folder: Path) -> list[str]:
    """Remove write-then-rename leftovers directly inside ``folder``; returns their names."""
    gone = []
    for p in folder.iterdir() if folder.is_dir() else ():
        if is_temp(p.name):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            gone.append(p.name)
    return gone


class Store:
    def __init__(self, state_dir: Path, create: bool = True):
        """``create=False``: a read-only view (for `status` beside a running agent): creates nothing."""
        self.dir = Path(state_dir)
        if create:
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
        doc["events"] = doc.get("events", [])[-MAX_EVENTS:]
        atomic_write(self.path, json.dumps(doc, indent=1, sort_keys=True).encode())

    def slot(self, name: str) -> Path:
        return self.dir / "slots" / name

    def bundle_sha256(self, slot: str | None) -> str | None:
        """SHA-256 of the bundle ``slot`` was installed from (None: unknown, or no slot)."""
        return ((self.load().get("slots") or {}).get(slot) or {}).get("bundle_sha256") if slot else None

    def sweep(self) -> list[str]:
        """At start-up, by the state dir's owner, with no update in progress: remove temp files of killed
        writes, half-extracted slot folders and slots that are neither active nor previous."""
        doc = self.load()
        gone = sweep_temp(self.dir) + [f"slots/{n}" for n in sweep_temp(self.dir / "slots")]
        if not doc.get("update"):
            keep = {doc.get("active"), doc.get("previous")}
            for p in (self.dir / "slots").iterdir():
                if p.name not in keep:
                    shutil.rmtree(p, ignore_errors=True)
                    gone.append(f"slots/{p.name}")
        if gone:
            log.info("removed leftovers of interrupted writes from %s: %s", self.dir, ", ".join(sorted(gone)))
        return gone
