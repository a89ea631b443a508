"""Optional fine-tuning with tensorflow-model-optimization: magnitude pruning and QAT.

Both need a Keras source and labelled training data (integer class ids, sparse categorical
cross-entropy). Pruned models are stripped of their pruning wrappers before conversion.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from toolkit.build.data import Dataset
from toolkit.errors import ConversionError, FineTuningError, InputError
from toolkit.build.ingest import SourceModel
from toolkit.tfenv import import_keras

PRUNE_FREQUENCY = 10  # steps between pruning mask updates
SPARSITY_TOLERANCE = 0.02  # a pruned model may miss the requested sparsity by this much (rounding per layer)


def _check(source: SourceModel, train: Dataset | None, what: str) -> None:
    if source.kind != "keras":
        raise InputError(f"{what} needs a Keras model (.keras/.h5); {source.path} is {source.kind}")
    if train is None or train.labels is None:
        raise InputError(f"{what} needs training data with labels: --train data.npz holding the "
                         f"inputs and 'y' (integer class ids)")


def _compile(model: Any, source: SourceModel) -> None:
    keras = import_keras()
    last = source.handle.layers[-1]
    from_logits = getattr(last, "activation", None) is not keras.activations.softmax
    model.compile(optimizer=keras.optimizers.Adam(1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
                  metrics=["accuracy"])


def _x(train: Dataset) -> Any:
    return train.inputs if len(train.inputs) > 1 else train.inputs[0]


def prune(source: SourceModel, train: Dataset | None, sparsity: float, epochs: int = 2) -> tuple[Any, float]:
    """Magnitude-prune to ``sparsity`` with fine-tuning; returns (stripped model, measured sparsity)."""
    _check(source, train, "--prune")
    if not 0.0 < sparsity < 1.0:
        raise InputError(f"--prune {sparsity}: sparsity must be between 0 and 1 (e.g. 0.5)")
    import_keras()
    import tensorflow_model_optimization as tfmot

    keras = import_keras()
    clone = keras.models.clone_model(source.handle)
    clone.set_weights(source.handle.get_weights())
    schedule = tfmot.sparsity.keras.ConstantSparsity(sparsity, begin_step=0, frequency=PRUNE_FREQUENCY)
    try:
        pruned = tfmot.sparsity.keras.prune_low_magnitude(clone, pruning_schedule=schedule)
    except ValueError as exc:
        raise ConversionError(f"pruning is not supported for this model ({exc})") from exc
    _compile(pruned, source)
    pruned.fit(_x(train), train.labels, epochs=epochs, batch_size=32, verbose=0,  # type: ignore[union-attr]
               callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    reached = kernel_sparsity(stripped)
    if reached < sparsity - SPARSITY_TOLERANCE:
        steps = epochs * -(-train.size // 32)  # type: ignore[union-attr]
        raise FineTuningError(f"--prune {sparsity}: only {reached:.1%} of kernel weights are zero after "
                              f"{epochs} epoch(s) ({steps} steps; masks update every {PRUNE_FREQUENCY} steps), "
                              f"below the requested {sparsity:.0%} (tolerance {SPARSITY_TOLERANCE:.0%}): "
                              f"train longer (--epochs) or with more data (--train)")
    return stripped, reached


def qat(source: SourceModel, train: Dataset | None, epochs: int = 2, base: Any = None) -> Any:
    """Quantization-aware training; returns the QAT Keras model (convert with Optimize.DEFAULT)."""
    _check(source, train, "--qat")
    import tensorflow_model_optimization as tfmot

    try:
        model = tfmot.quantization.keras.quantize_model(base or source.handle)
    except (ValueError, RuntimeError) as exc:
        raise ConversionError(f"quantization-aware training is not supported for this model ({exc})") from exc
    _compile(model, source)
    model.fit(_x(train), train.labels, epochs=epochs, batch_size=32, verbose=0)  # type: ignore[union-attr]
    return model


def kernel_sparsity(model: Any) -> float:
    zeros = total = 0
    for layer in model.layers:
        for w in layer.weights:
            if "kernel" in w.name:
                a = np.asarray(w)
                zeros += int(np.sum(a == 0))
                total += a.size
    return zeros / total if total else 0.0
