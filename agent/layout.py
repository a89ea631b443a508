"""How N samples of a model's inputs sit in one array: data files, golden sets and the Python API.

One convention for the host and the device, decided from the model's input shapes alone:

- ``batch``: every input has a leading batch axis (its first dimension is dynamic or 1). N samples are
  concatenated along axis 0; sample ``i`` is ``a[i:i + 1]``, the input at batch 1. Outputs come back
  the same way. This is the usual layout of image and text models.
- ``stack``: any other model, e.g. one with a scalar input (a sample rate) or a state tensor whose
  first dimension is not a batch (``[2, B, 128]``). Each array holds N samples stacked on a new
  leading axis; sample ``i`` is ``a[i]``, the input exactly as the model takes it. A scalar input
  becomes shape ``(N,)``, a state ``[2, 1, 128]`` becomes ``(N, 2, 1, 128)``; outputs are stacked the
  same way.

Either way axis 0 of every array counts samples, so data can be sliced and chunked along it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

BATCH, STACK = "batch", "stack"


def layout_of(shapes: Sequence[Sequence[int]]) -> str:
    """``batch`` when every input's first dimension is dynamic (-1) or 1, else ``stack``."""
    return BATCH if all(len(s) >= 1 and s[0] in (-1, 1) for s in shapes) else STACK


def sample_shape(shape: Sequence[int], layout: str) -> tuple[int, ...]:
    """The shape one array must have after its leading sample axis (-1 = any size)."""
    return tuple(shape[1:]) if layout == BATCH else tuple(shape)


def describe(shape: Sequence[int], layout: str) -> str:
    """``(N, 3, 224, 224)``-style text for error messages."""
    dims = ["N"] + ["?" if d == -1 else str(d) for d in sample_shape(shape, layout)]
    return "(" + ", ".join(dims) + (",)" if len(dims) == 1 else ")")


def samples(arrays: Sequence[np.ndarray], layout: str) -> list[list[np.ndarray]]:
    """One model call's feed per sample: ``a[i:i + 1]`` (batch) or ``a[i]`` (stack)."""
    n = int(arrays[0].shape[0]) if arrays else 0
    if layout == BATCH:
        return [[a[i:i + 1] for a in arrays] for i in range(n)]
    return [[a[i, ...] for a in arrays] for i in range(n)]  # a[i, ...]: a 0-d array, not a numpy scalar


def join(parts: Sequence[Mapping[str, np.ndarray]], layout: str) -> dict[str, np.ndarray]:
    """Per-sample outputs back into N-sample arrays, in the same layout as the inputs."""
    if not parts:
        return {}
    out = {}
    for k in parts[0]:
        arrs = [np.asarray(p[k]) for p in parts]
        out[k] = np.concatenate(arrs) if layout == BATCH and arrs[0].ndim else np.stack(arrs)
    return out
