"""Example models built in-repo (no downloads): a digits CNN trained on scikit-learn's digits,
a variant that plain int8 breaks (for selective quantization), and a MobileNetV2-shaped model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.tfenv import import_keras

LABELS = [str(i) for i in range(10)]


def digits_data() -> dict[str, np.ndarray]:
    """scikit-learn's 8x8 digits (ships with the package), scaled to [0, 1], split 1200/597."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    x, y = x[idx], y[idx]
    return {"x_train": x[:1200], "y_train": y[:1200], "x_val": x[1200:], "y_val": y[1200:]}


def train_digits(epochs: int = 30, seed: int = 0, outlier: bool = False) -> Any:
    """A small CNN; ``outlier=True`` adds one huge constant activation that ruins per-tensor int8."""
    keras = import_keras()
    keras.utils.set_random_seed(seed)
    data = digits_data()
    inp = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv")(inp)
    h = keras.layers.MaxPooling2D(name="pool")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(64, activation="relu", name="hidden")(h)
    out = keras.layers.Dense(10, activation="softmax", name="probs")(h)
    model = keras.Model(inp, out, name="digits")
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(data["x_train"], data["y_train"], epochs=epochs, batch_size=32, verbose=0)
    if outlier:
        # Unit 0 of 'hidden' always outputs 5000 and 'probs' ignores it: the float model is unchanged,
        # but the per-tensor int8 scale of 'hidden' becomes ~20, wiping out every other unit.
        w, b = model.get_layer("hidden").get_weights()
        w[:, 0], b[0] = 0.0, 5000.0
        model.get_layer("hidden").set_weights([w, b])
        w2, b2 = model.get_layer("probs").get_weights()
        w2[0, :] = 0.0
        model.get_layer("probs").set_weights([w2, b2])
    return model


def write_digits(folder: str | Path, epochs: int = 30, outlier: bool = False) -> dict[str, Path]:
    """Train and write model + calibration/validation/training data + metadata into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = digits_data()
    model = train_digits(epochs=epochs, outlier=outlier)
    stem = "digits-outlier" if outlier else "digits"
    paths = {"model": folder / f"{stem}.keras", "calibration": folder / "calibration.npz",
             "validation": folder / "validation.npz", "train": folder / "train.npz",
             "meta": folder / "meta.json"}
    model.save(paths["model"])
    np.savez(paths["calibration"], image=data["x_train"][:200])
    np.savez(paths["validation"], image=data["x_val"], y=data["y_val"])
    np.savez(paths["train"], image=data["x_train"], y=data["y_train"])
    paths["meta"].write_text(json.dumps({
        "labels": LABELS,
        "preprocessing": {"input": "image", "layout": "NHWC", "shape": [8, 8, 1],
                          "description": "8x8 grey digit, pixel values 0..16 divided by 16"},
        "postprocessing": {"type": "classification", "output": "probs", "activation": "softmax"},
    }, indent=2))
    return paths


def mobilenet_v2(input_size: int = 224, classes: int = 1000) -> Any:
    """keras.applications.MobileNetV2 with random weights (weights=None: no download)."""
    keras = import_keras()
    keras.utils.set_random_seed(0)
    return keras.applications.MobileNetV2(input_shape=(input_size, input_size, 3), weights=None,
                                          classes=classes)


def retrain_head(src: str | Path, dst: str | Path, epochs: int = 8, seed: int = 1) -> Path:
    """Version 2 of a digits model: only the classifier head ('probs') is trained further, the body is
    frozen — the usual field update, and the case delta updates are made for."""
    keras = import_keras()
    keras.utils.set_random_seed(seed)
    model = keras.models.load_model(src)
    for layer in model.layers:
        layer.trainable = layer.name == "probs"
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    data = digits_data()
    model.fit(data["x_train"], data["y_train"], epochs=epochs, batch_size=32, verbose=0)
    model.save(dst)
    return Path(dst)
