"""The crash-safe install engine: one transition table, small states, write-ahead persistence.

    Verify ─▶ Stage ─▶ VerifyModel ─▶ Commit ─▶ Cleanup ─▶ Done
      │         │           │            │
      └▶ Failure ◀─ Rollback ◀──────────┘   (any failure after Verify rolls back)

A state that matters for recovery is saved *before* it runs (write-ahead). Commit switches the active
slot and records the next state (Cleanup) in one atomic write. On start-up ``recover`` resumes from the
persisted state per RECOVERY; every state is idempotent, and a save counter ends crash loops.

Any exception in any state (a refusal, a full disk, an allocation that fails) is a Failure event with its
cause recorded. A slot is named after the whole signed content (the manifest's SHA-256, which covers every
file's hash), and the state keeps, per model name, the highest version ever installed (the anti-rollback
floor, which survives switching to another model).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable

from agent import device as dev
from agent.bundle import Limits, extract_bundle, verify_bundle
from agent.errors import AgentError, CompatibilityError, SealError, StorageError
from agent.golden import replay
from agent.keys import Keyring
from agent.manifest import Manifest, canonical_json, parse_manifest
from agent.runtime import Model, load_model
from agent.seal import Sealing
from agent.store import Store

log = logging.getLogger(__name__)
MAX_SAVES = 20


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
UNDO = {St.ROLLBACK, St.FAILURE, St.CLEANUP}  # idempotent, and they free space: run even when a save fails


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
    profile: str | None = None  # when set, bundles built for another profile are refused


def describe(exc: BaseException) -> str:
    """The cause of a failure, as recorded and reported: our own errors say it themselves."""
    if isinstance(exc, AgentError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return f"out of memory ({type(exc).__name__}: {exc})"
    return f"{type(exc).__name__}: {exc}"


def manifest_sha256(folder: Path) -> str:
    """What identifies a slot's content: the SHA-256 of its signed manifest (which lists every file's hash)."""
    return hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()


class Engine:
    """Runs one update at a time. ``on_commit(slot, model)`` is called after the active slot switched;
    ``model`` is the instance VerifyModel already loaded and checked (None when there is none)."""

    def __init__(self, store: Store, keyring: Keyring, device: Device,
                 on_commit: Callable[[str, Model | None], None] = lambda slot, model: None,
                 faults: dict[str, str] | None = None, limits: Limits = Limits(), opener: Any = None):
        """``keyring``: a Keyring or an agent.trust.Trust (checked at each install); ``opener``: the device's
        model key (agent.seal.Opener) for sealed bundles."""
        self.store, self.keyring, self.device, self.limits = store, keyring, device, limits
        self.opener = opener
        self.on_commit, self.faults = on_commit, faults or {}
        self._verified: tuple[str, Model] | None = None  # reused by Commit: the model is loaded once

    # ------------------------------------------------------------ public
    def install(self, bundle: Path, allow_downgrade: bool = False, allow_model_change: bool = False) -> Result:
        """``allow_model_change``: the bundle may replace a served model of another name (an explicit act)."""
        doc = self.store.load()
        if doc.get("update"):
            self.recover()
            doc = self.store.load()
        upd = {"bundle": str(bundle), "allow_downgrade": allow_downgrade, "allow_model_change": allow_model_change,
               "saves": 0, "from": doc.get("active"), "slot": None, "error": "", "started": time.time()}
        return self._run(St.VERIFY, upd)

    def recover(self) -> Result | None:
        doc = self.store.load()
        upd = doc.get("update")
        if not upd:
            return None
        try:
            state = St(upd.get("state"))
            resume = RECOVERY[state]
        except (ValueError, KeyError):
            state, resume = St.ROLLBACK, St.ROLLBACK  # an unknown persisted state: undo whatever it was
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
            try:
                event = self._step(state, upd)
            except Exception as exc:  # every error is a state (Mender's rule), whatever raised it
                cause = describe(exc)
                log.error("%s failed for %s: %s", state.value, upd["bundle"], cause)
                upd["error"] = f"{upd['error']}; then {state.value} failed: {cause}" if upd.get("error") else cause
                event = Ev.FAILURE
            if state is St.VERIFY and event is Ev.NOTHING_TO_DO:
                result.status = "nothing-to-do"
            state = TRANSITIONS[(state, event)]
        if upd.get("error"):
            result.status = "rolled-back" if St.ROLLBACK.value in chain else "refused"
            result.reason = upd["error"]
        result.chain, result.version = chain, upd.get("version")
        return result

    def _step(self, state: St, upd: dict) -> Ev:
        if state in PERSISTED and state is not St.COMMIT:  # Commit persists itself, then switches
            try:
                self._persist(upd)  # write-ahead: "entering <state>"
            except Exception as exc:
                if state not in UNDO:
                    raise
                log.error("cannot save the update state (%s); undoing anyway", describe(exc))
            self._fault(state, "crash")
        self._fault(state, "error")
        return getattr(self, f"_{state.name.lower()}")(upd)

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
        bundle = Path(upd["bundle"])
        m = verify_bundle(bundle, self.keyring, self.limits)
        digest = hashlib.sha256(canonical_json(m.data)).hexdigest()  # the exact signed bytes (canonical)
        upd.update(version=m.version, name=m.name, manifest_sha256=digest, slot=f"{m.name}-v{m.version}-{digest[:12]}")
        with open(bundle, "rb") as fh:
            upd["bundle_sha256"] = hashlib.file_digest(fh, "sha256").hexdigest()
        problems = dev.problems(m, self.device.arch, self.device.profile)
        if problems:
            raise next(iter(problems.values()))
        if (sealing := Sealing.of(m)) is not None:  # refused here, before Stage, when not sealed for us
            if self.opener is None:
                raise SealError(f"{m.id} is encrypted and this device has no model key (model_key in agent.toml)")
            self.opener.data_key(sealing, str(bundle))
        doc = self.store.load()
        active = doc.get("active")
        current = self.manifest_of(active)
        current_sha = manifest_sha256(self.store.slot(active)) if current else None
        floor = _floor(doc, current).get(m.name)
        # same version, different content: refused first, whatever is active
        if floor and m.version == floor["version"] and digest != floor["manifest_sha256"]:
            raise CompatibilityError(f"{m.id} has the same version as the {m.name} installed before but "
                                     f"different content; versions must increase")
        if current_sha == digest:
            return Ev.NOTHING_TO_DO
        if floor and m.version < floor["version"] and not upd["allow_downgrade"]:
            raise CompatibilityError(f"{m.id} is older than {m.name}@{floor['version']} installed before "
                                     f"(anti-rollback); use an explicit rollback to go back")
        if current is not None and current.name != m.name and not upd.get("allow_model_change"):
            raise CompatibilityError(f"{m.id} would replace the served model {current.id}; changing the served "
                                     f"model is explicit (--allow-model-change)")
        self._check_space(m, upd["slot"], doc)
        return Ev.SUCCESS

    def _check_space(self, m: Manifest, slot: str, doc: dict[str, Any]) -> None:
        """Refuse before Stage when the new slot would not fit (its files + a margin for state writes)."""
        if slot in (doc.get("active"), doc.get("previous")):
            return  # already on disk
        need = sum(f.size for f in m.files) + self.limits.min_free_bytes
        free = shutil.disk_usage(self.store.dir).free
        if need > free:
            raise StorageError(f"{self.store.dir}: not enough free space for {m.id}: it needs {need} bytes "
                               f"({need - self.limits.min_free_bytes} for its files + {self.limits.min_free_bytes} "
                               f"margin), {free} are free; free some space and retry")

    def _stage(self, upd: dict) -> Ev:
        dest = self.store.slot(upd["slot"])
        doc = self.store.load()
        if upd["slot"] in (doc.get("active"), doc.get("previous")):
            return Ev.SUCCESS  # re-installing the previous slot: already on disk and verified
        shutil.rmtree(dest, ignore_errors=True)
        extract_bundle(Path(upd["bundle"]), self.keyring, dest, self.limits, self.opener)
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
        doc.setdefault("slots", {})[upd["slot"]] = {"bundle_sha256": upd.get("bundle_sha256"),
                                                    "manifest_sha256": upd.get("manifest_sha256")}
        floor = doc.setdefault("floor", {})
        if upd["version"] > floor.get(upd["name"], {}).get("version", 0):
            floor[upd["name"]] = {"version": upd["version"], "manifest_sha256": upd.get("manifest_sha256")}
        upd["state"] = St.CLEANUP.value
        doc["update"] = upd
        self.store.save(doc)  # the switch, what it installed and the next state, in one atomic write
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
        keep = {doc.get("active"), doc.get("previous")}
        doc["slots"] = {k: v for k, v in (doc.get("slots") or {}).items() if k in keep}
        doc["last_update"] = {"bundle": upd["bundle"], "version": upd.get("version"), "outcome": outcome,
                              "error": upd.get("error", ""), "t": time.time()}
        doc["events"].append({"t": time.time(), "event": outcome, "version": upd.get("version"),
                              "error": upd.get("error", "")})
        self.store.save(doc)


def _floor(doc: dict[str, Any], current: Manifest | None) -> dict[str, dict[str, Any]]:
    """Per model name, the highest version installed and its manifest hash (state dirs from before the
    floor existed start from the active model)."""
    floor = dict(doc.get("floor") or {})
    if current is not None and current.version > floor.get(current.name, {}).get("version", 0):
        floor[current.name] = {"version": current.version,
                               "manifest_sha256": hashlib.sha256(canonical_json(current.data)).hexdigest()}
    return floor
