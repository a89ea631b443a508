"""Device trust in the install engine: every error is a state (a full disk, an allocation that fails),
every size a bundle declares is checked before anything is read or allocated, slots are named by the whole
signed content, and anti-rollback holds across model names."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import Limits
from agent.serve.service import Agent
from test_install import X, bundles, rebundle, rewrite_outputs  # noqa: F401 (bundles: a fixture)


def _files(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture()
def small_disk(tmp_path):
    """A 2 MiB tmpfs: a disk that really fills up (root only; skipped where mounting is not permitted)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave: int) -> None:
    """Leave exactly ``leave`` bytes (page-aligned) free on ``disk``."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as fh:
        fh.truncate(0)
        fh.write(b"\0" * (free - leave))
    assert shutil.disk_usage(disk).free == leave


def _pages(n: int) -> int:
    return -(-n // 4096) * 4096


def test_disk_full_during_stage_is_a_failure_with_its_cause(small_disk, keyring, bundles):
    """The free-space check passes (margin 0) but extraction still runs out of space (the manifest and
    signature need pages too): ENOSPC is recorded as the cause, the update rolls back, v1 keeps serving."""
    a = Agent(small_disk / "state", keyring, "aarch64", limits=Limits(min_free_bytes=0))
    a.start()
    assert a.install(bundles["v1"]).ok
    sizes = [len(b) for n, b in _files(bundles["v2"]).items() if n not in ("manifest.json", "manifest.sig")]
    _fill(small_disk, sum(_pages(n) for n in sizes))
    r = a.install(bundles["v2"])
    assert r.status == "rolled-back" and r.chain == ["Verify", "Stage", "Rollback", "Failure", "Cleanup"], r
    assert "No space left on device" in r.reason and r.reason.startswith("OSError")
    doc = a.store.load()
    assert doc["update"] is None and "No space left on device" in doc["last_update"]["error"]
    assert a.current.manifest.version == 1 and a.predict(X)["probs"].shape == (3, 10)
    assert [p.name for p in (small_disk / "state" / "slots").iterdir()] == [doc["active"]]  # no half slot


def test_not_enough_free_space_is_refused_before_stage(small_disk, keyring, bundles):
    margin = 64 << 10
    a = Agent(small_disk / "state", keyring, "aarch64", limits=Limits(min_free_bytes=margin))
    a.start()
    assert a.install(bundles["v1"]).ok
    _fill(small_disk, _pages(bundles["v2"].stat().st_size))  # the files fit, the margin does not
    r = a.install(bundles["v2"])
    assert r.status == "refused" and r.chain == ["Verify", "Failure", "Cleanup"], r
    assert "not enough free space" in r.reason and f"+ {margin} margin" in r.reason
    assert a.current.manifest.version == 1
    (small_disk / "filler").unlink()
    assert a.install(bundles["v2"]).status == "installed"


def _declaring(shape: tuple[int, ...]):
    """An output array whose .npy header declares ``shape`` (its data stays small)."""
    def npy(arr: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(arr.dtype),
                                                   "fortran_order": False, "shape": shape})
        return buf.getvalue() + arr.tobytes()
    return npy


@pytest.mark.parametrize("shape, match", [
    ((1 << 40, 64), r"declares 281474976710656 bytes of data"),  # 256 TiB: numpy would try to allocate it
    ((1000, 1000), r"declares 4000000 bytes of data .* but the entry holds"),  # more than the entry holds
])
def test_golden_header_sizes_are_checked_before_allocating(tmp_path, keyring, bundles, signing_key, shape, match):
    a = Agent(tmp_path / "state", keyring, "aarch64")
    a.start()
    assert a.install(bundles["v1"]).ok
    golden = _files(bundles["v2"])["golden.npz"]
    hostile = rebundle(bundles["v1"], tmp_path / "hostile.bundle", signing_key, version=2,
                       files={"golden.npz": rewrite_outputs(golden, _declaring(shape))})
    r = a.install(hostile)
    assert r.status == "rolled-back" and r.chain[-4:] == ["VerifyModel", "Rollback", "Failure", "Cleanup"], r
    assert re.search(match, r.reason), r.reason
    assert a.current.manifest.version == 1 and a.store.load()["update"] is None


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_sparse_members_are_refused_before_hashing(tmp_path, keyring, bundles, fmt, monkeypatch):
    """GNU tar writes real sparse entries (old GNU 'S' headers, or pax GNU.sparse 1.0): a 512 MiB model of
    holes in a 10 KiB file. Refused by its header, before a byte of it is read or hashed."""
    if shutil.which("tar") is None:
        pytest.skip("GNU tar not installed")
    from agent.bundle import _canonical_header

    (tmp_path / "model.tflite").open("wb").truncate(512 << 20)
    gnu = tmp_path / "gnu.tar"
    args = ["--format=gnu"] if fmt == "gnu" else ["--format=pax", "--sparse-version=1.0"]
    subprocess.run(["tar", "--sparse", *args, "-cf", str(gnu), "-C", str(tmp_path), "model.tflite"], check=True)
    with tarfile.open(gnu) as tar:
        assert tar.next().issparse()
        end = tar.offset  # where GNU tar's sparse entry ends
    canonical = b""  # the other entries exactly as write_bundle writes them: only the sparse one is odd
    for name, data in _files(bundles["v2"]).items():
        if name != "model.tflite":
            canonical += _canonical_header(name, len(data)) + data + bytes(-len(data) % 512)
    bundle = tmp_path / f"sparse-{fmt}.bundle"
    bundle.write_bytes(canonical + gnu.read_bytes()[:end] + bytes(10240))
    assert bundle.stat().st_size < 1 << 20
    hashed = []
    import agent.bundle

    real = agent.bundle.hashlib.sha256
    monkeypatch.setattr(agent.bundle.hashlib, "sha256", lambda *a: hashed.append(1) or real(*a))
    a = Agent(tmp_path / "state", keyring, "aarch64")
    a.start()
    r = a.install(bundle)
    assert r.status == "refused" and "model.tflite: only plain regular files are allowed (sparse" in r.reason, r.reason
    assert len(hashed) == 3  # manifest.json, manifest.sig, golden.npz: never the sparse entry
    assert list((tmp_path / "state" / "slots").iterdir()) == []


def test_same_name_and_version_with_other_content_is_refused_first(tmp_path, keyring, bundles, signing_key):
    """A different model with the same name, version and golden set: not "nothing to do" (the slot is named
    after the whole signed manifest, and the content check runs before the "already active" one)."""
    a = Agent(tmp_path / "state", keyring, "aarch64")
    a.start()
    assert a.install(bundles["v2"]).ok
    model = bytearray(_files(bundles["v2"])["model.tflite"])
    model[-1] ^= 1
    other = rebundle(bundles["v2"], tmp_path / "other.bundle", signing_key, files={"model.tflite": bytes(model)})
    r = a.install(other)
    assert r.status == "refused" and "same version as the digits installed before but different content" in r.reason
    assert a.install(bundles["v2"]).status == "nothing-to-do"
    slot = a.store.load()["active"]
    digest = hashlib.sha256((a.store.slot(slot) / "manifest.json").read_bytes()).hexdigest()
    assert slot == f"digits-v2-{digest[:12]}"
    assert a.status()["installed_sha256"] == hashlib.sha256(bundles["v2"].read_bytes()).hexdigest()


def test_anti_rollback_floor_survives_a_model_change(tmp_path, keyring, bundles, signing_key):
    """digits v2, then digits-legacy v1 (an explicit model change), then digits v1: refused, the floor for
    "digits" is still 2. Changing the served model's name needs --allow-model-change."""
    d = bundles["dir"]
    legacy = rebundle(bundles["v1"], d / "legacy.bundle", signing_key, name="digits-legacy")
    a = Agent(tmp_path / "state", keyring, "aarch64")
    a.start()
    assert a.install(bundles["v2"]).ok
    r = a.install(legacy)
    assert r.status == "refused" and "would replace the served model digits@2" in r.reason
    assert a.install(legacy, allow_model_change=True).status == "installed"
    assert a.current.manifest.name == "digits-legacy"
    r = a.install(bundles["v1"], allow_model_change=True)
    assert r.status == "refused" and "older than digits@2 installed before (anti-rollback)" in r.reason
    assert a.current.manifest.name == "digits-legacy"
    assert a.install(bundles["v1"], allow_downgrade=True, allow_model_change=True).status == "installed"
    assert a.install(bundles["v3"]).status == "installed"
    assert a.store.load()["floor"]["digits"]["version"] == 3


def test_state_stays_bounded(tmp_path, keyring, bundles, signing_key):
    """Refused and repeated installs do not grow the state file: events are capped, slot records pruned."""
    from agent.store import MAX_EVENTS

    a = Agent(tmp_path / "state", keyring, "aarch64")
    a.start()
    bad = rebundle(bundles["v2"], tmp_path / "arch.bundle", signing_key, arch="armv7l")
    for _ in range(MAX_EVENTS + 10):
        assert a.install(bad).status == "refused"
    for v in ("v1", "v2", "v3"):
        assert a.install(bundles[v]).ok
    doc = json.loads((tmp_path / "state" / "state.json").read_text())
    assert len(doc["events"]) == MAX_EVENTS and set(doc["slots"]) == {doc["active"], doc["previous"]}
