"""Where the host keeps its state. Parsed once at the entry point; nothing reads the environment
at import time. Precedence: flag > environment > default."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def default_runtimes_dir() -> Path:
    """Device-runtime venvs are a cache (pip can rebuild them), shared by every HOME: the CLI, the tests and
    CI all use this one place. ``$EDGESHIP_RUNTIMES``, else ``$XDG_CACHE_HOME/edgeship/runtimes``, else
    ``~/.cache/edgeship/runtimes``."""
    if os.environ.get("EDGESHIP_RUNTIMES"):
        return Path(os.environ["EDGESHIP_RUNTIMES"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "edgeship" / "runtimes"


@dataclass(frozen=True)
class Settings:
    home: Path
    profiles_dirs: tuple[Path, ...] = ()
    runtimes_dir: Path | None = None  # None: default_runtimes_dir()

    @classmethod
    def resolve(cls, home: str | None, profiles_dir: tuple[str, ...] = ()) -> "Settings":
        h = Path(home or os.environ.get("EDGESHIP_HOME") or Path.home() / ".edgeship").expanduser()
        env_dirs = tuple(Path(p) for p in os.environ.get("EDGESHIP_PROFILES", "").split(":") if p)
        return cls(h, tuple(Path(p) for p in profiles_dir) + env_dirs, default_runtimes_dir())

    @property
    def runtimes(self) -> Path:
        return self.runtimes_dir or default_runtimes_dir()

    @property
    def key_path(self) -> Path:
        return self.home / "keys" / "signing.pem"

    @property
    def keyring_path(self) -> Path:
        return self.home / "keys"

    @property
    def registry_path(self) -> Path:
        return self.home / "registry.db"

    def runtime_env(self, runtime: str, version: str) -> Path:
        return self.runtimes / f"{runtime}-{version}"

    def runtime_pythons(self) -> dict[str, str]:
        root = self.runtimes
        if not root.is_dir():
            return {}
        return {d.name: str(d / "bin" / "python") for d in sorted(root.iterdir())
                if (d / "bin" / "python").exists() and (d / ".ready").exists()}
