"""Delta updates: a new bundle as a zstd patch against the bundle the device already runs.

The base is the content of the installed bundle's files (model, golden set, ...) concatenated in
manifest order — the device has them in its active slot, the host in the old bundle. The patch is the
new bundle compressed by zstd with that base as a raw-content dictionary (like ``zstd --patch-from``),
so when only a model's head changed the patch is a small fraction of the bundle. The device rebuilds the full bundle and checks it against the signed bundle hash; a
patch that fails to apply or does not reproduce that hash is dropped for the full bundle.

zstandard is optional on the device: without it the agent simply never asks for deltas.

A sealed (encrypted) bundle is random bytes, so a patch of its tar against the base would be as large as
the bundle. Its delta (codec ``zstd-sealed``) is made from the plaintext instead: the new bundle's signed
manifest and signature in clear (they are in clear in the bundle too), then the zstd patch of the new
plaintext files against the base, encrypted under the bundle's data key. The device checks the signature
first, unwraps the data key with its model key, decrypts and applies the patch, encrypts each file again
with the nonce its manifest names (AES-GCM is deterministic given key and nonce) and packs the canonical
tar: the result must be exactly the signed bundle hash, or the delta is dropped for the full bundle.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from typing import Any, Callable

from agent.errors import AgentError, DeltaError

CODEC = "zstd"
SEALED_CODEC = "zstd-sealed"
CODECS = (CODEC, SEALED_CODEC)
LEVEL = 19
MAX_WINDOW_LOG = 30  # 1 GiB: the decoder refuses patches that ask for more
_MAGIC = b"ESP1"


def available() -> bool:
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


def base_content(read: Callable[[str], bytes], files: list[str]) -> bytes:
    """The patch base: the bundle's files (manifest order, without the manifest itself) concatenated."""
    return b"".join(read(path) for path in files)


def _window_log(base_size: int, new_size: int) -> int:
    return min(MAX_WINDOW_LOG, max(20, (base_size + new_size).bit_length()))


def make_patch(base: bytes, new: bytes) -> dict[str, Any]:
    """Patch ``new`` against ``base``: {"patch": bytes, "window_log": int, "base_sha256", "target_sha256"}."""
    import zstandard as zstd

    wl = _window_log(len(base), len(new))
    params = zstd.ZstdCompressionParameters.from_level(LEVEL, window_log=wl, enable_ldm=True)
    comp = zstd.ZstdCompressor(dict_data=zstd.ZstdCompressionDict(base, dict_type=zstd.DICT_TYPE_RAWCONTENT),
                               compression_params=params)
    return {"patch": comp.compress(new), "window_log": wl, "base_sha256": hashlib.sha256(base).hexdigest(),
            "target_sha256": hashlib.sha256(new).hexdigest()}


def apply_patch(base: bytes, patch: bytes, target_sha256: str, target_size: int, window_log: int) -> bytes:
    """Rebuild the target from ``base`` + ``patch``; DeltaError unless it has exactly the expected hash."""
    return _checked(_decompress(base, patch, target_size, window_log), target_sha256, target_size)


def _decompress(base: bytes, patch: bytes, size: int, window_log: int) -> bytes:
    try:
        import zstandard as zstd
    except ImportError as exc:
        raise DeltaError("delta patch received but zstandard is not installed") from exc
    if not 10 <= window_log <= MAX_WINDOW_LOG:
        raise DeltaError(f"patch window_log {window_log} is outside 10..{MAX_WINDOW_LOG}")
    try:
        dec = zstd.ZstdDecompressor(dict_data=zstd.ZstdCompressionDict(base, dict_type=zstd.DICT_TYPE_RAWCONTENT),
                                    max_window_size=1 << window_log)
        out = dec.decompress(patch, max_output_size=size)
    except zstd.ZstdError as exc:
        raise DeltaError(f"patch does not apply: {exc}") from exc
    if len(out) != size:
        raise DeltaError(f"patch rebuilt {len(out)} bytes, not {size}")
    return out


def _checked(out: bytes, target_sha256: str, target_size: int) -> bytes:
    if len(out) != target_size or hashlib.sha256(out).hexdigest() != target_sha256:
        raise DeltaError("patched bundle does not match the signed bundle hash")
    return out


# ---------------------------------------------------------------- sealed bundles
def make_sealed_patch(base: bytes, bundle: bytes, manifest: bytes, signature: bytes, payload: bytes,
                      data_key: bytes) -> dict[str, Any]:
    """The delta of a sealed ``bundle`` (with its manifest and signature bytes and its plaintext ``payload``,
    the files in manifest order) against ``base``: the same keys as make_patch."""
    from agent.seal import encrypt_stream

    inner = make_patch(base, payload)
    prefix = os.urandom(7)
    head = (_MAGIC + struct.pack(">I", len(manifest)) + manifest + struct.pack(">I", len(signature)) + signature
            + prefix + struct.pack(">Q", len(inner["patch"])))
    sealed = encrypt_stream(inner["patch"], data_key, prefix, b"patch")
    return {**inner, "patch": head + sealed, "target_sha256": hashlib.sha256(bundle).hexdigest()}


def apply_sealed_patch(base: bytes, patch: bytes, target_sha256: str, target_size: int, window_log: int,
                       keyring: Any, opener: Any, max_header: int = 1 << 20) -> bytes:
    """Rebuild a sealed bundle from ``base`` and a sealed patch. The manifest's signature is checked before
    any decryption, and the result must be exactly the signed bundle hash."""
    from agent.bundle import pack, read_signature
    from agent.manifest import canonical_json, parse_manifest
    from agent.seal import SEGMENT, Sealing, decrypt_stream, encrypt_stream, sealed_size

    if opener is None:
        raise DeltaError("sealed patch received but this device has no model key")
    try:
        buf = io.BytesIO(patch)
        if buf.read(4) != _MAGIC:
            raise DeltaError("not a sealed patch")
        parts = []
        for _ in range(2):
            (n,) = struct.unpack(">I", buf.read(4))
            if n > max_header:
                raise DeltaError(f"a header part of {n} bytes exceeds {max_header}")
            parts.append(buf.read(n))
        manifest_raw, sig_raw = parts
        prefix = buf.read(7)
        (inner_size,) = struct.unpack(">Q", buf.read(8))
        if len(prefix) != 7 or sealed_size(inner_size) != len(patch) - buf.tell():
            raise DeltaError("truncated, or inconsistent lengths")
        kid, sig = read_signature(sig_raw, "sealed patch")
        keyring.verify(kid, manifest_raw, sig, "sealed patch manifest")  # before any decryption work
        m = parse_manifest(manifest_raw)
        sealing = Sealing.of(m)
        if sealing is None or manifest_raw != canonical_json(m.data) or m.key_id != kid:
            raise DeltaError("the manifest is not a sealed bundle's canonical manifest")
        key = opener.data_key(sealing, "sealed patch")
        inner = b"".join(decrypt_stream(buf, inner_size, key, prefix, b"patch", SEGMENT, "sealed patch"))
        payload = _decompress(base, inner, sum(sealing.files[f.path][1] for f in m.files), window_log)
    except (AgentError, struct.error) as exc:
        raise DeltaError(f"sealed patch does not apply: {exc}") from exc
    files, pos = {}, 0
    for f in m.files:
        nonce, size = sealing.files[f.path]
        files[f.path] = encrypt_stream(payload[pos:pos + size], key, nonce, f.path.encode(), sealing.segment)
        pos += size
    return _checked(pack(manifest_raw, sig_raw, files), target_sha256, target_size)
