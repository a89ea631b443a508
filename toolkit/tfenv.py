"""Import TensorFlow the one way that works with tensorflow-model-optimization.

tfmot does not support Keras 3: ``TF_USE_LEGACY_KERAS=1`` must be set before TensorFlow is first
imported, and models are built and loaded with ``tf_keras``. Every toolkit module gets TensorFlow here.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any


def import_tf() -> Any:
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    elif os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        raise RuntimeError("TensorFlow was imported before edgeship could set TF_USE_LEGACY_KERAS=1; "
                           "import toolkit.tfenv.import_tf() first")
    warnings.filterwarnings("ignore", module="tensorflow")
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
