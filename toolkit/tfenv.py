"""Import TensorFlow the one way that works with tensorflow-model-optimization.

tfmot does not support Keras 3: ``TF_USE_LEGACY_KERAS=1`` must be set before TensorFlow is first
imported, and models are built and loaded with ``tf_keras``. Every toolkit module gets TensorFlow here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """TensorFlow, absl and the MLIR converter print to the C-level stderr (``I0000 … port.cc:153] oneDNN …``,
    ``WARNING: All log messages before absl::InitializeLog() …``); keep the user's terminal readable.
    EDGESHIP_DEBUG=1 lets them through."""
    if os.environ.get("EDGESHIP_DEBUG"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def native_stderr_to(path: Path | None) -> Iterator[None]:
    """For the CLI's whole run: what native libraries write straight to file descriptor 2 (TensorFlow's and
    absl's ``I0000 …`` lines, LiteRT's ``INFO: Created TensorFlow Lite XNNPACK delegate``, a native crash)
    goes to ``path`` (written only when there was any; None or unwritable: discarded), while Python's own
    stderr (progress, warnings, errors) still reaches the terminal."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    sink = tempfile.TemporaryFile()
    old = sys.stderr
    try:
        real = old if not _is_fd2(old) else open(os.dup(saved), "w", buffering=1, encoding=old.encoding,
                                                   errors="backslashreplace")
    except OSError:
        real = old
    os.dup2(sink.fileno(), 2)
    sys.stderr = real
    try:
        yield
    finally:
        if real is not old:
            real.flush()
        sys.stderr = old
        os.dup2(saved, 2)
        os.close(saved)
        if real is not old:
            real.close()
        _keep(sink, path)


def _keep(sink: Any, path: Path | None) -> None:
    try:
        sink.seek(0)
        data = sink.read()
        if data and path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    except OSError:
        pass  # a log of library chatter is not worth failing a command for
    finally:
        sink.close()


def _is_fd2(stream: Any) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False  # e.g. click's CliRunner or pytest's capture


def import_tf() -> Any:
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    elif os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        raise RuntimeError("TensorFlow was imported before edgeship could set TF_USE_LEGACY_KERAS=1; "
                           "import toolkit.tfenv.import_tf() first")
    warnings.filterwarnings("ignore", module="tensorflow")
    with quiet_stderr():
        import tensorflow as tf

    tf.get_logger().setLevel(logging.ERROR)
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:  # pragma: no cover
        pass
    return tf


def import_keras() -> Any:
    import_tf()
    import tf_keras

    return tf_keras
