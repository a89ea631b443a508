"""`edgeship-agent doctor`: what this device has, and whether a bundle would install here.

The bundle checks are the install engine's own (signature and hashes as Verify checks them, then
``agent.device.problems``), so doctor and a real update cannot disagree. Doctor only reads: it writes
nothing to the state folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from agent import device as dev
from agent.bundle import Limits, inspect_bundle, verify_bundle
from agent.errors import AgentError
from agent.manifest import Manifest
from agent.seal import Sealing, load_opener
from agent.trust import load_trust


def check_bundle(path: Path, keyring: Path | None, arch: str, state_dir: Path,
                 profile: str | None = None, root_key: Path | None = None,
                 model_key: Path | None = None) -> dict[str, Any]:
    """Every check an install of ``path`` would make here: name, ok (None: not checked), detail.
    ``root_key``: the keyring is a root-signed document (the state dir's newer copy counts, as at install);
    ``model_key``: opens sealed bundles."""
    checks: list[dict[str, Any]] = []

    def add(name: str, ok: bool | None, detail: str) -> None:
        checks.append({"check": name, "ok": ok, "detail": detail})

    m: Manifest | None = None
    if keyring is not None and keyring.exists():
        try:
            m = verify_bundle(path, load_trust(keyring, root_key, state_dir if state_dir.is_dir() else None))
            add("signature", True, f"signed by trusted key {m.key_id}; every file hash matches")
        except AgentError as exc:
            add("signature", False, str(exc))
    else:
        add("signature", None, f"not checked: no keyring at {keyring} (pass --keyring)")
    if m is None:  # not verified: read the manifest anyway, to say what else would stop it
        try:
            m = Manifest.from_dict(inspect_bundle(path)[0])
        except AgentError as exc:
            add("manifest", False, str(exc))
            return _verdict(path, None, checks)
    try:
        if (sealing := Sealing.of(m)) is not None:
            opener = load_opener(model_key)
            if opener is None:
                add("sealed", False, "encrypted, and no model key is configured (model_key)")
            else:
                opener.data_key(sealing, str(path))
                add("sealed", True, f"encrypted for this device's model key {opener.key_id}")
    except AgentError as exc:
        add("sealed", False, str(exc))
    reserve = Limits().min_free_bytes
    problems = dev.problems(m, arch, profile, state_dir, reserve)
    add("arch", "arch" not in problems, str(problems.get("arch", f"{m.arch}, like this device")))
    if profile:
        add("profile", "profile" not in problems, str(problems.get("profile", f"{m.profile}, as configured")))
    if "runtime" in problems:
        add("runtime", False, str(problems["runtime"]))
    else:
        rt = dev.runtime_for(m, arch)
        add("runtime", True, f"runs in {rt.name} {rt.version} (built for {m.runtime} "
                             f">= {m.runtime_min_version})")
    want = (m.data.get("runtime") or {}).get("numpy") or "any"
    add("numpy", "numpy" not in problems, str(problems.get("numpy", f"{np.__version__} (bundle needs {want})")))
    delegate = (m.data.get("runtime") or {}).get("delegate") or "none"
    add("delegate", "delegate" not in problems, str(problems.get("delegate", f"{delegate}: available")))
    free = dev.free_bytes(state_dir)
    need = sum(f.size for f in m.files) + reserve
    add("disk", "disk" not in problems, str(problems.get(
        "disk", f"needs {need / 1e6:.1f} MB in {state_dir}, "
                f"{'free space unknown' if free is None else f'{free / 1e6:.0f} MB free'}")))
    return _verdict(path, m, checks)


def _verdict(path: Path, m: Manifest | None, checks: list[dict[str, Any]]) -> dict[str, Any]:
    oks = [c["ok"] for c in checks]
    would = False if False in oks else (None if None in oks else True)
    return {"bundle": str(path), "model": m.id if m else None, "profile": m.profile if m else None,
            "would_install": would, "checks": checks}


def report(state_dir: Path, arch: str, bundle: Path | None, keyring: Path | None,
           profile: str | None = None, root_key: Path | None = None, model_key: Path | None = None) -> dict[str, Any]:
    doc = dev.probe(state_dir, arch).to_dict()
    if bundle is not None:
        doc["bundle"] = check_bundle(bundle, keyring, arch, state_dir, profile, root_key, model_key)
    return doc


def text(doc: dict[str, Any]) -> str:
    rts = []
    for name, r in doc["runtimes"].items():
        if r["usable"]:
            rts.append(f"{name} {r['version']}")
        elif r["version"]:
            rts.append(f"{name} {r['version']} UNUSABLE: {r['problem']}")
        else:
            rts.append(f"{name}: not installed" + (f" ({r['no_wheels'].split(';')[0]})" if r["no_wheels"] else ""))
    free = doc["free_bytes"]
    lines = [f"arch        {doc['arch']}", f"python      {doc['python']}", f"numpy       {doc['numpy']}",
             "runtimes    " + "\n            ".join(rts),
             f"zstandard   {doc['zstandard'] or 'not installed (no delta updates: full bundles only)'}",
             f"state dir   {doc['state_dir']}: " + ("free space unknown" if free is None
                                                     else f"{free / 1e9:.2f} GB free"),
             f"time sync   {doc['time_sync']} ({doc['time_sync_source']})"]
    b = doc.get("bundle")
    if b:
        verdict = {True: "would install", False: "would NOT install",
                   None: "compatible, but the signature was not checked"}[b["would_install"]]
        lines.append(f"bundle      {b['bundle']}" + (f" ({b['model']}, {b['profile']})" if b["model"] else "")
                     + f": {verdict}")
        for c in b["checks"]:
            mark = {True: "ok ", False: "NO ", None: "?  "}[c["ok"]]
            lines.append(f"  {mark} {c['check']:<9} {c['detail']}")
    return "\n".join(lines)
