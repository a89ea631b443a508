"""One owner per state dir: an exclusive ``flock`` on ``state_dir/agent.lock``.

`edgeship-agent run` holds it for its whole life; `install` and `rollback` without a running agent hold it
while they work. The kernel releases it when the owner dies (even by SIGKILL), so a stale lock never
blocks a restart. The file also says who holds it (pid and role), for error messages only.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from agent.errors import BusyError

log = logging.getLogger(__name__)
LOCK_FILE = "agent.lock"


class StateLock:
    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir)
        self.path = self.dir / LOCK_FILE
        self._fd: int | None = None

    def try_acquire(self, role: str) -> bool:
        """Take the lock if nobody holds it; never waits."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "role": role}).encode(), 0)
        self._fd = fd
        return True

    def acquire(self, role: str, wait: float = 0.0, give_up: Callable[[], bool] = lambda: False) -> "StateLock":
        """Take the lock, waiting up to ``wait`` seconds for a short-lived owner (a CLI install) to finish;
        ``give_up()`` ends the wait early (e.g. the owner is a running agent that will not go away)."""
        end = time.monotonic() + wait
        while not self.try_acquire(role):
            if give_up() or time.monotonic() >= end:
                raise BusyError(f"{self.dir} is in use by {self.describe_holder()}; only one process may own a "
                                f"state dir")
            time.sleep(0.1)
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def holder(self) -> dict[str, Any]:
        """Who holds the lock, as it wrote itself into the file (informational: may be stale)."""
        try:
            doc = json.loads(self.path.read_text())
            return doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            return {}

    def describe_holder(self) -> str:
        h = self.holder()
        return f"pid {h['pid']} ({h.get('role', '?')})" if h.get("pid") else "another process"

    def __enter__(self) -> "StateLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
