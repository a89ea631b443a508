"""The crash-safe install engine: one transition table, small states, write-ahead persistence.

    Verify ─▶ Stage ─▶ VerifyModel ─▶ Commit ─▶ Cleanup ─▶ Done
      │         │           │            │
      └▶ Failure ◀─ Rollback ◀──────────┘   (any failure after Verify rolls back)

A state that matters for recovery is saved *before* it runs (write-ahead). Commit switches the active
slot and records the next state (Cleanup) in one atomic write. On start-up ``recover`` resumes from the
persisted state per RECOVERY; every state is idempotent, and a save counter ends crash loops.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable

import numpy as np

from agent import device as dev
from agent.bundle import Limits, extract_bundle, verify_bundle
from agent.errors import AgentError, CompatibilityError, DiskSpaceError, RuntimeMissingError
from agent.golden import replay
from agent.keys import Keyring
from agent.manifest import Manifest, parse_manifest
from agent.runtime import Model, load_model
from agent.store import Store

log = logging.getLogger(__name__)
MAX_SAVES = 20
DISK_RESERVE = 8 << 20  # free space kept beyond the extracted files (state writes, logs)


class St(str, Enum):
    VERIFY = "Verify"
    STAGE = "Stage"
    VERIFY_MODEL = "VerifyModel"
    COMMIT = "Commit"
    ROLLBACK = "Rollback"
    FAILURE = "Failure"
    CLEANUP = "Cleanup"
    DONE = "Done"


class Ev(str, Enum):
    SUCCESS = "Success"
    FAILURE = "Failure"
    NOTHING_TO_DO = "NothingToDo"


TRANSITIONS: dict[tuple[St, Ev], St] = {
    (St.VERIFY, Ev.SUCCESS): St.STAGE,
    (St.VERIFY, Ev.FAILURE): St.FAILURE,
    (St.VERIFY, Ev.NOTHING_TO_DO): St.DONE,
    (St.STAGE, Ev.SUCCESS): St.VERIFY_MODEL,
    (St.STAGE, Ev.FAILURE): St.ROLLBACK,
    (St.VERIFY_MODEL, Ev.SUCCESS): St.COMMIT,
    (St.VERIFY_MODEL, Ev.FAILURE): St.ROLLBACK,
    (St.COMMIT, Ev.SUCCESS): St.CLEANUP,
    (St.COMMIT, Ev.FAILURE): St.ROLLBACK,
    (St.ROLLBACK, Ev.SUCCESS): St.FAILURE,
    (St.ROLLBACK, Ev.FAILURE): St.FAILURE,
    (St.FAILURE, Ev.SUCCESS): St.CLEANUP,
    (St.FAILURE, Ev.FAILURE): St.CLEANUP,
    (St.CLEANUP, Ev.SUCCESS): St.DONE,
    (St.CLEANUP, Ev.FAILURE): St.DONE,
}

# Where a restarted agent resumes, for every persisted state.
RECOVERY: dict[St, St] = {
    St.STAGE: St.ROLLBACK,        # partial slot: remove it
    St.VERIFY_MODEL: St.ROLLBACK,  # never went live
    St.COMMIT: St.ROLLBACK,        # the commit write did not happen (else we'd be in Cleanup)
    St.ROLLBACK: St.ROLLBACK,
    St.FAILURE: St.FAILURE,
    St.CLEANUP: St.CLEANUP,
}
PERSISTED = set(RECOVERY)


@dataclass
class Result:
    status: str  # installed | refused | nothing-to-do | rolled-back | recovered
    chain: list[str] = field(default_factory=list)
    reason: str = ""
    version: int | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("installed", "nothing-to-do", "recovered")


@dataclass
class Device:
    arch: str
    threads: int | None = None


class Engine:
    """Runs one update at a time. ``on_commit(slot, model)`` is called after the active slot switched;
    ``model`` is the instance VerifyModel already loaded and checked (None when there is none)."""

    def __init__(self, store: Store, keyring: Keyring, device: Device,
                 on_commit: Callable[[str, Model | None], None] = lambda slot, model: None,
                 faults: dict[str, str] | None = None, limits: Limits = Limits()):
        self.store, self.keyring, self.device, self.limits = store, keyring, device, limits
        self.on_commit, self.faults = on_commit, faults or {}
        self._verified: tuple[str, Model] | None = None  # reused by Commit: the model is loaded once

    # ------------------------------------------------------------ public
    def install(self, bundle: Path, allow_downgrade: bool = False) -> Result:
        doc = self.store.load()
        if doc.get("update"):
            self.recover()
            doc = self.store.load()
        upd = {"bundle": str(bundle), "allow_downgrade": allow_downgrade, "saves": 0,
               "from": doc.get("active"), "slot": None, "error": "", "started": time.time()}
        return self._run(St.VERIFY, upd)

    def recover(self) -> Result | None:
        doc = self.store.load()
        upd = doc.get("update")
        if not upd:
            return None
        state = St(upd["state"])
        resume = RECOVERY[state]
        log.warning("recovering interrupted update of %s: was in %s, resuming in %s",
                    upd.get("bundle"), state.value, resume.value)
        upd["error"] = upd.get("error") or f"agent stopped during {state.value}"
        res = self._run(resume, upd)
        if res.status == "installed":
            res.status = "recovered"
        return res

    def rollback(self) -> str:
        """Explicit rollback to the previous slot (allowed to lower the version)."""
        doc = self.store.load()
        if doc.get("update"):
            raise AgentError("an update is in progress; try again when it has finished")
        prev = doc.get("previous")
        if not prev or not self.store.slot(prev).is_dir():
            raise AgentError("no previous version to roll back to")
        doc["active"], doc["previous"] = prev, doc.get("active")
        doc["events"].append({"t": time.time(), "event": "rollback", "active": prev})
        self.store.save(doc)
        self.on_commit(prev, None)
        return prev

    def manifest_of(self, slot: str | None) -> Manifest | None:
        if not slot:
            return None
        return parse_manifest((self.store.slot(slot) / "manifest.json").read_bytes())

    # ------------------------------------------------------------ machine
    def _run(self, state: St, upd: dict) -> Result:
        chain: list[str] = []
        result = Result("installed")
        while state is not St.DONE:
            chain.append(state.value)
            if state in PERSISTED:
                upd["state"] = state.value
                upd["saves"] = upd.get("saves", 0) + 1
                if upd["saves"] > MAX_SAVES:
                    log.error("update of %s re-entered states %d times: giving up", upd["bundle"], MAX_SAVES)
                    upd["error"] = f"crash loop: gave up after {MAX_SAVES} state saves"
                    self._finish(upd, "failed")
                    return Result("refused", chain, upd["error"])
                if state is not St.COMMIT:  # Commit persists itself, then switches
                    self._persist(upd)
                    self._fault(state, "crash")
            try:
                self._fault(state, "error")
                event = getattr(self, f"_{state.name.lower()}")(upd)
            except AgentError as exc:
                log.error("%s failed for %s: %s", state.value, upd["bundle"], exc)
                upd["error"] = str(exc)
                event = Ev.FAILURE
            if state is St.VERIFY and event is Ev.NOTHING_TO_DO:
                result.status = "nothing-to-do"
            state = TRANSITIONS[(state, event)]
        if upd.get("error"):
            result.status = "rolled-back" if St.ROLLBACK.value in chain else "refused"
            result.reason = upd["error"]
        result.chain, result.version = chain, upd.get("version")
        return result

    def _persist(self, upd: dict) -> None:
        doc = self.store.load()
        doc["update"] = upd
        self.store.save(doc)

    def _fault(self, state: St, kind: str) -> None:
        if self.faults.get(state.value) == kind:
            if kind == "crash":
                os.kill(os.getpid(), signal.SIGKILL)
            raise AgentError(f"injected error in {state.value}")

    # ------------------------------------------------------------ states
    def _verify(self, upd: dict) -> Ev:
        m = verify_bundle(Path(upd["bundle"]), self.keyring, self.limits)
        upd["version"], upd["name"] = m.version, m.name
        upd["slot"] = f"{m.name}-v{m.version}-{m.files[0].sha256[:8]}"
        problems = compatibility_problems(m, self.device.arch, self.store.dir)
        if problems:
            raise next(iter(problems.values()))
        active = self.store.load().get("active")
        current = self.manifest_of(active)
        if current is not None and current.name == m.name:
            if upd["slot"] == active:
                return Ev.NOTHING_TO_DO
            if m.version < current.version and not upd["allow_downgrade"]:
                raise CompatibilityError(f"{m.id} is older than the installed {current.id} "
                                         f"(anti-rollback); use an explicit rollback to go back")
            if m.version == current.version:
                raise CompatibilityError(f"{m.id} has the same version as the installed model but "
                                         f"different content; versions must increase")
        return Ev.SUCCESS

    def _stage(self, upd: dict) -> Ev:
        dest = self.store.slot(upd["slot"])
        doc = self.store.load()
        if upd["slot"] in (doc.get("active"), doc.get("previous")):
            return Ev.SUCCESS  # re-installing the previous slot: already on disk and verified
        shutil.rmtree(dest, ignore_errors=True)
        extract_bundle(Path(upd["bundle"]), self.keyring, dest, self.limits)
        return Ev.SUCCESS

    def _verify_model(self, upd: dict) -> Ev:
        folder = self.store.slot(upd["slot"])
        m = parse_manifest((folder / "manifest.json").read_bytes())
        model = load_model(folder / m.model_file, threads=self.device.threads or m.threads)
        replay(model, m, folder)
        self._verified = (upd["slot"], model)
        return Ev.SUCCESS

    def _commit(self, upd: dict) -> Ev:
        self._persist(upd)  # write-ahead: "entering Commit"
        self._fault(St.COMMIT, "crash")
        doc = self.store.load()
        if doc.get("active") != upd["slot"]:
            doc["previous"], doc["active"] = doc.get("active"), upd["slot"]
        upd["state"] = St.CLEANUP.value
        doc["update"] = upd
        self.store.save(doc)  # the switch and the next state, in one atomic write
        verified, self._verified = self._verified, None
        self.on_commit(upd["slot"], verified[1] if verified and verified[0] == upd["slot"] else None)
        return Ev.SUCCESS

    def _rollback(self, upd: dict) -> Ev:
        self._verified = None
        doc = self.store.load()
        if upd.get("slot") and doc.get("active") == upd["slot"] and upd.get("from") != upd["slot"]:
            doc["active"], doc["previous"] = upd.get("from"), None
            self.store.save(doc)
            self.on_commit(doc["active"], None)
        keep = {doc.get("active"), doc.get("previous")}
        if upd.get("slot") and upd["slot"] not in keep:
            shutil.rmtree(self.store.slot(upd["slot"]), ignore_errors=True)
        return Ev.SUCCESS

    def _failure(self, upd: dict) -> Ev:
        log.error("update %s failed: %s", upd["bundle"], upd.get("error"))
        return Ev.SUCCESS

    def _cleanup(self, upd: dict) -> Ev:
        doc = self.store.load()
        keep = {doc.get("active"), doc.get("previous")}
        for slot in (self.store.dir / "slots").iterdir():
            if slot.name not in keep:
                shutil.rmtree(slot, ignore_errors=True)
        self._finish(upd, "failed" if upd.get("error") else "installed")
        return Ev.SUCCESS

    def _finish(self, upd: dict, outcome: str) -> None:
        doc = self.store.load()
        doc["update"] = None
        doc["last_update"] = {"bundle": upd["bundle"], "version": upd.get("version"), "outcome": outcome,
                              "error": upd.get("error", ""), "t": time.time()}
        doc["events"].append({"t": time.time(), "event": outcome, "version": upd.get("version"),
                              "error": upd.get("error", "")})
        self.store.save(doc)


def compatibility_problems(m: Manifest, arch: str, state_dir: Path | None = None) -> dict[str, AgentError]:
    """Why this device cannot take ``m``, by check (arch, runtime, numpy, disk); empty: it can. Verify
    refuses with the first; ``edgeship-agent doctor --bundle`` shows them all. The runtime's version and
    NumPy constraint apply when ``m`` runs in the runtime it was built for."""
    problems: dict[str, AgentError] = {}
    if m.arch != arch:
        problems["arch"] = CompatibilityError(
            f"{m.id} is built for {m.arch} (profile {m.profile}, {m.runtime}); this device is {arch}: "
            f"build it with a profile for {arch}{' such as rpi3-armv7' if arch == 'armv7l' else ''}")
    try:
        rt = dev.runtime_for(m, arch)
        if rt.name == m.runtime:  # a substitute (LiteRT for tflite-runtime) has its own versions
            if not dev.at_least(rt.version, m.runtime_min_version):
                problems["runtime"] = RuntimeMissingError(f"{m.id} needs {m.runtime} {m.runtime_min_version} or "
                                                          f"newer; this device has {rt.version}")
            want = (m.data.get("runtime") or {}).get("numpy")
            if isinstance(want, str) and want and not dev.satisfies(np.__version__, want):
                problems["numpy"] = CompatibilityError(f"{m.id} runs in {m.runtime}, which needs numpy {want}; "
                                                       f"this device has numpy {np.__version__}")
    except RuntimeMissingError as exc:
        problems["runtime"] = exc
    need = sum(f.size for f in m.files) + DISK_RESERVE
    free = dev.free_bytes(state_dir) if state_dir is not None else None
    if free is not None and free < need:
        problems["disk"] = DiskSpaceError(f"{m.id} needs {need / 1e6:.1f} MB free in {state_dir} to install; "
                                          f"{free / 1e6:.1f} MB are free")
    return problems
