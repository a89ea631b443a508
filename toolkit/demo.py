"""`edgeship demo`: the whole host story on the embedded example, with no set-up.

Trains the digits CNN (scikit-learn's digits ship with the package), builds it for three device
profiles, verifies a bundle like a device would, and classifies held-out digits with it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from toolkit.settings import Settings

PROFILES = ["rpi4-arm64", "rpi3-armv7", "x86_64-onnx"]


def run_demo(s: Settings, workdir: Path, quick: bool = False, echo: Callable[[str], None] = print) -> dict:
    from agent.bundle import extract_bundle
    from agent.golden import replay
    from agent.keys import Keyring
    from agent.runtime import load_model
    from toolkit.build import BuildOptions, build
    from toolkit.examples import write_digits
    from toolkit.measure import LatencyConfig
    from toolkit.profiles import find_profile, search_dirs
    from toolkit.registry import Registry
    from toolkit.report import write_report
    from toolkit.signing import load_or_create

    echo(f"1/4 training the digits example into {workdir}")
    paths = write_digits(workdir / "example")
    key = load_or_create(s.key_path)
    dirs = search_dirs(list(s.profiles_dirs))
    reg = Registry(s.registry_path)
    echo(f"2/4 building for {', '.join(PROFILES)} (signing key {key.key_id})")
    opts = BuildOptions(model=paths["model"], profiles=[find_profile(p, dirs) for p in PROFILES],
                        validation=paths["validation"], calibration=paths["calibration"],
                        out_dir=workdir / "dist", key=key, meta=json.loads(paths["meta"].read_text()),
                        registry=reg, latency=LatencyConfig(runs=10, seconds=0.1, warmup_seconds=0.05)
                        if quick else LatencyConfig(), runtime_pythons=s.runtime_pythons())
    try:
        result = build(opts, progress=lambda m: echo(f"    {m}"))
    finally:
        reg.close()
    write_report(result, workdir / "dist" / "report.html")
    echo(result.table())
    chosen = result.profiles[0]
    assert chosen.bundle is not None
    echo(f"3/4 verifying {chosen.bundle.name} as a device would (signature, hashes, golden set)")
    with tempfile.TemporaryDirectory(prefix="edgeship-demo-") as tmp:
        folder = Path(tmp) / "b"
        manifest = extract_bundle(chosen.bundle, Keyring.load(s.keyring_path), folder)
        model = load_model(folder / manifest.model_file, threads=manifest.threads)
        worst = replay(model, manifest, folder)
        echo(f"    {manifest.id} {manifest.precision} OK; golden max |error| {worst:.3g}")
        echo("4/4 classifying held-out digits with the bundle's model")
        with np.load(paths["validation"]) as val:
            x, y = val["image"], val["y"]
        pred = model.predict(x)[manifest.outputs[0].name].argmax(1)
    acc = float(np.mean(pred == y))
    echo(f"    {len(y)} held-out digits, accuracy {acc:.4f} "
         f"(fp32 reference {chosen.chosen.metrics.get('reference_accuracy', 0):.4f})")
    echo(f"report: {workdir / 'dist' / 'report.html'}")
    return {"accuracy": acc, "bundles": [str(p.bundle) for p in result.profiles]}
