"""The signed bundle: one uncompressed tar holding a signed manifest, the model and its golden set.

Layout (in this order): ``manifest.json`` (canonical JSON), ``manifest.sig`` (Ed25519 over the
manifest bytes), then the files the manifest lists, sorted by name. Every entry is a plain file with
fixed mtime/owner/mode, so the same inputs give a byte-identical bundle.

Reading is defensive: only regular files with plain names, bounded sizes and counts; each entry's header
must be exactly the canonical one (no sparse, pax or GNU extension headers) before a byte of it is read;
every byte is hashed against the signed manifest before anything is trusted or moved into place.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from agent.errors import BundleError, SealError, SignatureError
from agent.keys import Keyring
from agent.manifest import SCHEMA_VERSION, SEALED_SCHEMA, Manifest, _NAME, canonical_json, parse_manifest
from agent.store import atomic_write, fsync_dir

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Upper bounds a bundle must respect before the agent reads it."""

    max_file_bytes: int = 1 << 30
    max_total_bytes: int = 2 << 30
    max_manifest_bytes: int = 1 << 20
    max_members: int = 32
    min_free_bytes: int = 16 << 20  # free space an install must leave on the state dir's disk

    @property
    def max_bundle_bytes(self) -> int:
        """The largest bundle file these limits can accept (contents + one header and padding per entry)."""
        return self.max_total_bytes + (self.max_members + 2) * 2 * tarfile.BLOCKSIZE + tarfile.RECORDSIZE


def write_bundle(path: str | Path, manifest: dict[str, Any], files: dict[str, bytes],
                 signer: Callable[[bytes], bytes], key_id: str) -> Manifest:
    """Write a signed, reproducible bundle atomically. Fills in schema, key id and file hashes."""
    doc = dict(manifest)
    doc["schema"] = SEALED_SCHEMA if "encryption" in doc else SCHEMA_VERSION
    doc["key_id"] = key_id
    doc["files"] = [{"path": n, "sha256": hashlib.sha256(b).hexdigest(), "size": len(b)}
                    for n, b in sorted(files.items())]
    parsed = Manifest.from_dict(json.loads(canonical_json(doc)))  # never write what we cannot read
    body = canonical_json(doc)
    sig = json.dumps({"algorithm": "ed25519", "key_id": key_id,
                      "signature": base64.b64encode(signer(body)).decode()}, sort_keys=True).encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, pack(body, sig, files), public=True)  # a bundle is signed (and, sealed, encrypted)
    return parsed


def pack(manifest: bytes, signature: bytes, files: dict[str, bytes]) -> bytes:
    """The canonical tar of a bundle: manifest, signature, then the files sorted by name."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [(MANIFEST, manifest), (SIGNATURE, signature)] + sorted(files.items()):
            tar.addfile(_canonical_info(name, len(data)), io.BytesIO(data))
    return buf.getvalue()


def read_signature(raw: bytes, where: str) -> tuple[str, bytes]:
    try:
        doc = json.loads(raw.decode("utf-8"))
        if doc.get("algorithm") != "ed25519":
            raise SignatureError(f"{where}: unsupported signature algorithm {doc.get('algorithm')!r}")
        return str(doc["key_id"]), base64.b64decode(doc["signature"], validate=True)
    except SignatureError:
        raise
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SignatureError(f"{where}: malformed signature file ({exc})") from exc


def verify_bundle(path: str | Path, keyring: Keyring, limits: Limits = Limits()) -> Manifest:
    """Check a bundle completely (structure, signature, every hash) without extracting it."""
    return _scan(Path(path), keyring, limits, None)


def extract_bundle(path: str | Path, keyring: Keyring, dest: str | Path,
                   limits: Limits = Limits(), opener: Any = None) -> Manifest:
    """Verify a bundle and extract its files into ``dest``, which must not exist yet.

    Files go to a temporary folder beside ``dest`` (0600 files in a 0700 folder) and are renamed into place
    only after every check passed, so a refused bundle leaves nothing behind. A sealed bundle is decrypted
    there with ``opener`` (agent.seal.Opener, the device's model key) after its signature and every
    ciphertext hash were checked.
    """
    dest = Path(dest)
    if dest.exists():
        raise BundleError(f"{dest}: extraction target already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        manifest = _scan(Path(path), keyring, limits, tmp)
        if manifest.data.get("encryption") is not None:
            if opener is None:
                raise SealError(f"{path}: {manifest.id} is encrypted and this device has no model key "
                                f"(model_key in agent.toml, from `edgeship device enroll`)")
            opener.open_folder(tmp, manifest, str(path))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def inspect_bundle(path: str | Path, limits: Limits = Limits()) -> tuple[dict[str, Any], str]:
    """Read the manifest and signing key id WITHOUT trusting them (for display only)."""
    path = Path(path)
    try:
        with tarfile.open(path, mode="r:") as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in (MANIFEST, SIGNATURE):
                m = members.get(name)
                if m is None or not m.isfile() or m.size > limits.max_manifest_bytes:
                    raise BundleError(f"{path}: missing or oversized {name}")
            raw = tar.extractfile(members[MANIFEST]).read()  # type: ignore[union-attr]
            kid, _ = read_signature(tar.extractfile(members[SIGNATURE]).read(), f"{path}:{SIGNATURE}")  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{path}: not a readable edgeship bundle ({exc})") from exc
    try:
        return json.loads(raw), kid
    except ValueError as exc:
        raise BundleError(f"{path}:{MANIFEST}: not valid JSON ({exc})") from exc


def _scan(path: Path, keyring: Keyring, limits: Limits, sink: Path | None) -> Manifest:
    if not path.is_file():
        raise BundleError(f"{path}: bundle not found")
    seen: dict[str, tuple[str, int]] = {}
    raw_manifest = raw_sig = None
    total = pos = 0
    try:
        with tarfile.open(path, mode="r:") as tar, open(path, "rb") as raw:
            for count, member in enumerate(tar, start=1):
                where = f"{path}:{member.name}"
                if count > limits.max_members:
                    raise BundleError(f"{path}: more than {limits.max_members} entries")
                if member.issparse() or member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                    raise BundleError(f"{where}: only plain regular files are allowed (sparse entries, links, "
                                      f"folders and devices are refused)")
                if not _NAME.match(member.name) or member.name in seen:
                    raise BundleError(f"{where}: unsafe or duplicate entry name")
                limit = limits.max_manifest_bytes if member.name in (MANIFEST, SIGNATURE) \
                    else limits.max_file_bytes
                total += member.size
                if member.size > limit or total > limits.max_total_bytes:
                    raise BundleError(f"{where}: entry of {member.size} bytes exceeds the size limit")
                pos = _check_entry(raw, path, member, pos)  # before reading: no extension headers
                src = tar.extractfile(member)
                assert src is not None
                digest, size = hashlib.sha256(), 0
                out = _create(sink / member.name) if sink is not None else None
                try:
                    buf = bytearray() if member.name in (MANIFEST, SIGNATURE) else None
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        if buf is not None:
                            buf.extend(chunk)
                        if out is not None:
                            out.write(chunk)
                finally:
                    if out is not None:
                        out.close()
                if size != member.size:
                    raise BundleError(f"{where}: truncated ({size} of {member.size} bytes)")
                if member.name == MANIFEST:
                    raw_manifest = bytes(buf or b"")
                elif member.name == SIGNATURE:
                    raw_sig = bytes(buf or b"")
                seen[member.name] = (digest.hexdigest(), size)
            _check_end(raw, path, pos)
    except (tarfile.TarError, EOFError) as exc:
        raise BundleError(f"{path}: not a readable edgeship bundle, or truncated ({exc})") from exc
    if raw_manifest is None or raw_sig is None:
        raise BundleError(f"{path}: missing {MANIFEST} or {SIGNATURE}")
    kid, signature = read_signature(raw_sig, f"{path}:{SIGNATURE}")
    keyring.verify(kid, raw_manifest, signature, f"{path}:{SIGNATURE}")
    manifest = parse_manifest(raw_manifest)
    if manifest.key_id != kid:
        raise SignatureError(f"{path}: manifest names key {manifest.key_id}, signature key {kid}")
    if raw_manifest != canonical_json(manifest.data):
        raise BundleError(f"{path}:{MANIFEST}: not in canonical form")
    expected = {f.path for f in manifest.files} | {MANIFEST, SIGNATURE}
    if set(seen) != expected:
        extra, missing = set(seen) - expected, expected - set(seen)
        raise BundleError(f"{path}: entries do not match the manifest "
                          f"(unexpected: {sorted(extra)}, missing: {sorted(missing)})")
    for f in manifest.files:
        sha, size = seen[f.path]
        if size != f.size or sha != f.sha256:
            raise BundleError(f"{path}:{f.path}: hash or size mismatch (expected {f.size} bytes "
                              f"sha256 {f.sha256[:12]}…, got {size} bytes sha256 {sha[:12]}…)")
    return manifest


def _create(path: Path) -> Any:
    """A new file only the agent's user can read (a slot holds the model: it may be a secret)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "wb")


def _canonical_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _canonical_header(name: str, size: int) -> bytes:
    return _canonical_info(name, size).tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")


def _check_entry(fh: Any, path: Path, m: tarfile.TarInfo, pos: int) -> int:
    """Every byte outside file contents must be exactly what write_bundle emits: this entry starts where
    the last one ended, with the canonical header (so no pax/GNU/sparse extension can hide in it) and
    zero padding. Returns where the next entry must start."""
    blk = tarfile.BLOCKSIZE
    if m.offset != pos:
        raise BundleError(f"{path}:{m.name}: unexpected data before this entry (extension headers are refused)")
    fh.seek(pos)
    if fh.read(blk) != _canonical_header(m.name, m.size):
        raise BundleError(f"{path}:{m.name}: entry header is not canonical (altered bundle)")
    pad = -m.size % blk
    end = m.offset_data + m.size + pad
    if end > os.fstat(fh.fileno()).st_size:
        raise BundleError(f"{path}:{m.name}: truncated (the entry declares {m.size} bytes; the file ends "
                          f"{end - os.fstat(fh.fileno()).st_size} bytes short)")
    fh.seek(m.offset_data + m.size)
    if pad and fh.read(pad) != bytes(pad):
        raise BundleError(f"{path}:{m.name}: non-zero padding (altered bundle)")
    return m.offset_data + m.size + pad


def _check_end(fh: Any, path: Path, pos: int) -> None:
    """After the last entry: the standard end of archive, and nothing else."""
    blk = tarfile.BLOCKSIZE
    end = pos + 2 * blk
    end += -end % tarfile.RECORDSIZE
    fh.seek(pos)
    tail = fh.read(end - pos + 1)
    if len(tail) != end - pos or tail.count(0) != len(tail):
        raise BundleError(f"{path}: trailing bytes after the archive do not match (altered bundle)")
