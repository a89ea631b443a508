"""Pruning and quantization-aware training with tensorflow-model-optimization."""

from __future__ import annotations

import pytest

from toolkit.build.pipeline import build
from toolkit.errors import InputError


def test_prune_and_qat(make_options, digits, tmp_path):
    r = build(make_options(tmp_path / "dist", ["rpi4-arm64"], version=1, train=digits["train"],
                           prune=0.5, qat=True, epochs=2, keep_variants=tmp_path / "v"))
    assert any("pruned with tfmot" in n for n in r.notes)
    sparsity = float(next(n for n in r.notes if "pruned" in n).split(":")[1].split("%")[0]) / 100
    assert sparsity >= 0.45
    p = r.profiles[0]
    qat = next(v for v in p.variants if v.precision == "int8-qat")
    assert qat.passed, qat.reasons
    assert qat.metrics["accuracy_drop_points"] <= 1.5
    from agent.runtime import load_model

    m = load_model(qat.file)
    assert m.inputs[0].dtype == "int8"
    assert p.bundle is not None


def test_finetune_needs_labelled_training_data(make_options, digits, tmp_path):
    with pytest.raises(InputError, match="--prune needs training data with labels"):
        build(make_options(tmp_path / "d", ["rpi4-arm64"], prune=0.5))
    with pytest.raises(InputError, match="sparsity must be between 0 and 1"):
        build(make_options(tmp_path / "d", ["rpi4-arm64"], prune=1.5, train=digits["train"]))
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").glob("*.bundle"))
