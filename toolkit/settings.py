"""Where the host keeps its state. Parsed once at the entry point; nothing reads the environment
at import time. Precedence: flag > environment > default."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    home: Path
    profiles_dirs: tuple[Path, ...] = ()

    @classmethod
    def resolve(cls, home: str | None, profiles_dir: tuple[str, ...] = ()) -> "Settings":
        h = Path(home or os.environ.get("EDGESHIP_HOME") or Path.home() / ".edgeship").expanduser()
        env_dirs = tuple(Path(p) for p in os.environ.get("EDGESHIP_PROFILES", "").split(":") if p)
        return cls(h, tuple(Path(p) for p in profiles_dir) + env_dirs)

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
        return self.home / "runtimes" / f"{runtime}-{version}"

    def runtime_pythons(self) -> dict[str, str]:
        root = self.home / "runtimes"
        if not root.is_dir():
            return {}
        return {d.name: str(d / "bin" / "python") for d in sorted(root.iterdir())
                if (d / "bin" / "python").exists() and (d / ".ready").exists()}
