"""`edgeship demo`: the whole story on the embedded example, with no set-up.

Trains the digits CNN (scikit-learn's digits ship with the package), builds it for three device
profiles, verifies a bundle like a device would, then runs a local fleet (embedded broker, agent
processes): canary rollout, inference over HTTP with field labels, telemetry, a head-only v2 as a delta
update, and v3 calibrated on the low-confidence requests the agents captured.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from toolkit.settings import Settings

PROFILES = ["rpi4-arm64", "rpi3-armv7", "x86_64-onnx"]


def run_demo(s: Settings, workdir: Path, quick: bool = False, echo: Callable[[str], None] = print,
             agents: int = 4) -> dict:
    from agent.bundle import extract_bundle
    from agent.golden import replay
    from agent.keys import Keyring
    from agent.runtime import load_model
    from toolkit.build.pipeline import BuildOptions, build
    from toolkit.demo.fleet import run_fleet
    from toolkit.examples import write_digits
    from toolkit.build.measure import LatencyConfig
    from toolkit.profiles import find_profile, search_dirs
    from toolkit.registry import Registry
    from toolkit.build.report import write_report
    from toolkit.signing import load_or_create

    echo(f"1/8 training the digits example into {workdir}")
    paths = write_digits(workdir / "example")
    key = load_or_create(s.key_path)
    dirs = search_dirs(list(s.profiles_dirs))
    reg = Registry(s.registry_path)
    echo(f"2/8 building for {', '.join(PROFILES)} (signing key {key.key_id})")
    latency = LatencyConfig(runs=10, seconds=0.1, warmup_seconds=0.05) if quick else LatencyConfig()

    def options(model: Path, profiles: list[str], out: Path, registry: Registry) -> BuildOptions:
        return BuildOptions(model=model, profiles=[find_profile(p, dirs) for p in profiles],
                            validation=paths["validation"], calibration=paths["calibration"], out_dir=out, key=key,
                            meta=json.loads(paths["meta"].read_text()), registry=registry, latency=latency,
                            runtime_pythons=s.runtime_pythons())
    try:
        result = build(options(paths["model"], PROFILES, workdir / "dist", reg), progress=lambda m: echo(f"    {m}"))
    finally:
        reg.close()
    write_report(result, workdir / "dist" / "report.html")
    echo(result.table())
    chosen = result.profiles[0]
    assert chosen.bundle is not None
    echo(f"3/8 verifying {chosen.bundle.name} as a device would (signature, hashes, golden set)")
    with tempfile.TemporaryDirectory(prefix="edgeship-demo-") as tmp:
        folder = Path(tmp) / "b"
        manifest = extract_bundle(chosen.bundle, Keyring.load(s.keyring_path), folder)
        model = load_model(folder / manifest.model_file, threads=manifest.threads)
        worst = replay(model, manifest, folder)
        echo(f"    {manifest.id} {manifest.precision} OK; golden max |error| {worst:.3g}")
        with np.load(paths["validation"]) as val:
            x, y = val["image"], val["y"]
        pred = model.predict(x)[manifest.outputs[0].name].argmax(1)
    acc = float(np.mean(pred == y))
    echo(f"    {len(y)} held-out digits, accuracy {acc:.4f} "
         f"(fp32 reference {chosen.chosen.metrics.get('reference_accuracy', 0):.4f})")
    echo(f"build report: {workdir / 'dist' / 'report.html'}")

    def build_v2() -> Path:
        from toolkit.examples import retrain_head

        (workdir / "example-v2").mkdir(exist_ok=True)
        model = retrain_head(paths["model"], workdir / "example-v2" / paths["model"].name)  # same name: v2
        reg2 = Registry(s.registry_path)
        try:
            res = build(options(model, [PROFILES[0]], workdir / "dist-v2", reg2), progress=lambda m: echo(f"    {m}"))
        finally:
            reg2.close()
        assert res.profiles[0].bundle is not None
        return res.profiles[0].bundle

    def build_v3(field_data: Path) -> Path:  # v2's model, calibrated on the captured field data
        reg3 = Registry(s.registry_path)
        try:
            opts = options(workdir / "example-v2" / paths["model"].name, [PROFILES[0]], workdir / "dist-v3", reg3)
            opts.calibration = field_data
            res = build(opts, progress=lambda m: echo(f"    {m}"))
        finally:
            reg3.close()
        assert res.profiles[0].bundle is not None
        return res.profiles[0].bundle

    echo(f"4/8 starting a local fleet of {agents} devices")
    fleet = run_fleet(workdir, s.keyring_path, s.registry_path, key, chosen.bundle, build_v2, x, y, echo, agents,
                      build_v3)
    return {"accuracy": acc, "bundles": [str(p.bundle) for p in result.profiles], "fleet": fleet}
