"""Delta updates: a new bundle as a zstd patch against the bundle the device already runs.

The base is the content of the installed bundle's files (model, golden set, ...) concatenated in
manifest order — the device has them in its active slot, the host in the old bundle. The patch is the
new bundle compressed by zstd with that base as a raw-content dictionary (like ``zstd --patch-from``),
so when only a model's head changed the patch is a small fraction of the bundle. The device rebuilds the full bundle and checks it against the signed bundle hash; a
patch that fails to apply or does not reproduce that hash is dropped for the full bundle.

zstandard is optional on the device: without it the agent simply never asks for deltas.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

from agent.errors import DeltaError

CODEC = "zstd"
LEVEL = 19
MAX_WINDOW_LOG = 30  # 1 GiB: the decoder refuses patches that ask for more


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
    try:
        import zstandard as zstd
    except ImportError as exc:
        raise DeltaError("delta patch received but zstandard is not installed") from exc
    if not 10 <= window_log <= MAX_WINDOW_LOG:
        raise DeltaError(f"patch window_log {window_log} is outside 10..{MAX_WINDOW_LOG}")
    try:
        dec = zstd.ZstdDecompressor(dict_data=zstd.ZstdCompressionDict(base, dict_type=zstd.DICT_TYPE_RAWCONTENT),
                                    max_window_size=1 << window_log)
        out = dec.decompress(patch, max_output_size=target_size)
    except zstd.ZstdError as exc:
        raise DeltaError(f"patch does not apply: {exc}") from exc
    if len(out) != target_size or hashlib.sha256(out).hexdigest() != target_sha256:
        raise DeltaError("patched bundle does not match the signed bundle hash")
    return out
