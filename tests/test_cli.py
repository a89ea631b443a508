"""The `edgeship` CLI: build with --json, registry, keys, bundle inspect/verify, clean errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from toolkit.cli import cli


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("clihome")


def run(home, *args, ok=True):
    res = CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def built(home, digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("cliout")
    res = run(home, "build", str(digits["model"]), "-p", "rpi4-arm64", "-p", "x86_64-onnx",
              "--validation", str(digits["validation"]), "--calibration", str(digits["calibration"]),
              "--meta", str(digits["meta"]), "-o", str(out), "--quick", "--json")
    return out, json.loads(res.stdout)


def test_build_json_summary_and_report(built):
    out, summary = built
    assert summary["name"] == "digits" and summary["version"] == 1
    assert [p["profile"] for p in summary["profiles"]] == ["rpi4-arm64", "x86_64-onnx"]
    for p in summary["profiles"]:
        assert p["chosen"] and p["bundle"].endswith(f"digits-v1-{p['profile']}.bundle")
    assert (out / "digits-v1.json").is_file()
    html = (out / "digits-v1.html").read_text()
    assert "<img alt=\"variant plots\" src=\"data:image/png;base64," in html and "x86_64-onnx" in html


def test_registry_versions_increment(home, built, digits, tmp_path):
    res = run(home, "build", str(digits["model"]), "-p", "rpi3-armv7", "--validation",
              str(digits["validation"]), "-o", str(tmp_path), "--quick")
    assert "digits-v2-rpi3-armv7.bundle" in res.output
    assert "calibrating int8 variants on the validation data" in res.output
    assert " µs " in res.output  # a digits model runs in µs: say so, not 0.001 ms
    res = run(home, "models", "list", "--json")
    rows = json.loads(res.stdout)
    assert rows[0]["model"] == "digits" and rows[0]["latest"] == 2 and rows[0]["builds"] == 3
    hist = json.loads(run(home, "models", "history", "digits", "--json").stdout)
    assert [(h["version"], h["profile"]) for h in hist] == [(2, "rpi3-armv7"), (1, "rpi4-arm64"),
                                                           (1, "x86_64-onnx")]
    assert all(len(h["bundle_sha256"]) == 64 for h in hist)
    res = run(home, "models", "history", "nope", ok=False)
    assert res.exit_code == 1 and "no builds of model 'nope'" in res.output


def test_bundle_inspect_and_verify(home, built):
    _, summary = built
    bundle = summary["profiles"][0]["bundle"]
    res = run(home, "bundle", "inspect", bundle)
    assert "digits v1" in res.output and "image" in res.output and "(unverified)" in res.output
    res = run(home, "bundle", "verify", bundle)
    assert "signature OK" in res.output and "golden set OK" in res.output


def test_verify_with_unknown_key_fails_cleanly(home, built, tmp_path):
    _, summary = built
    run(home, "keys", "generate", "--out", str(tmp_path / "other.pem"))
    res = run(home, "bundle", "verify", summary["profiles"][0]["bundle"], "--keyring",
              str(tmp_path / "other.pub"), ok=False)
    assert res.exit_code == 1 and "does not trust" in res.output and "Traceback" not in res.output
    res = run(home, "keys", "generate", "--out", str(tmp_path / "other.pem"), ok=False)
    assert "already exists" in res.output


def test_errors_are_clean_messages(home, digits, tmp_path):
    res = run(home, "build", str(digits["model"]), "-p", "nope", "--validation",
              str(digits["validation"]), ok=False)
    assert res.exit_code == 1 and "unknown device profile 'nope'" in res.output
    res = run(home, "build", str(digits["model"]), ok=False)
    assert res.exit_code == 2  # usage error: missing --profile
    res = run(home, "profiles", "list")
    assert "rpi4-arm64" in res.output and "coral-edgetpu" in res.output
    show = json.loads(run(home, "profiles", "show", "rpi3-armv7", "--json").stdout)
    assert show["runtime"]["name"] == "tflite-runtime" and show["runtime"]["numpy"] == "<2"


def test_console_script_help_is_fast_to_import():
    proc = subprocess.run([sys.executable, "-m", "toolkit.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "build" in proc.stdout and "bundle" in proc.stdout


def test_agent_cli_verifies_and_predicts(home, built, digits, tmp_path):
    import numpy as np

    from agent.cli import cli as agent_cli

    _, summary = built
    bundle = summary["profiles"][0]["bundle"]
    pub = str(home / "keys" / "signing.pub")
    res = CliRunner().invoke(agent_cli, ["verify", bundle, "--keyring", pub])
    assert res.exit_code == 0 and "OK digits@1" in res.output, res.output
    with np.load(digits["validation"]) as v:
        x, y = v["image"][:5], v["y"][:5]
    np.save(tmp_path / "x.npy", x)
    res = CliRunner().invoke(agent_cli, ["predict", bundle, "--keyring", pub, "--input", str(tmp_path / "x.npy")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["model"] == "digits@1" and len(out["labels"]) == 5
    assert sum(int(a) == b for a, b in zip(out["labels"], y)) >= 4
    (tmp_path / "bad.json").write_text('{"image": [[1, 2]]}')
    res = CliRunner().invoke(agent_cli, ["predict", bundle, "--keyring", pub, "--input", str(tmp_path / "bad.json")])
    assert res.exit_code == 1 and "expected shape (N, 8, 8, 1)" in res.output


def test_coral_bundle_is_full_int8_with_uint8_io(make_options, tmp_path, keyring):
    import shutil as _sh

    from agent.bundle import verify_bundle
    from toolkit.build.pipeline import build

    r = build(make_options(tmp_path / "dist", ["coral-edgetpu"], version=1))
    p = r.profiles[0]
    m = verify_bundle(p.bundle, keyring)
    assert m.precision == "int8" and m.inputs[0].dtype == "uint8" and m.outputs[0].dtype == "uint8"
    if _sh.which("edgetpu_compiler") is None:
        assert any("edgetpu_compiler not found" in n for n in p.notes)


def test_demo_runs_end_to_end(tmp_path):
    """README command 1: `edgeship demo` (quick timing) trains, builds 3 profiles, verifies, then runs a
    local fleet: embedded broker, 4 agent processes, canary rollout, HTTP inference, delta v2, status."""
    res = CliRunner().invoke(cli, ["--home", str(tmp_path / "home"), "demo", "--quick"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "golden max |error|" in res.output
    acc = float(res.output.split("accuracy ")[1].split()[0])
    assert acc > 0.95
    assert len(list((tmp_path / "home" / "demo" / "dist").glob("*.bundle"))) == 3
    out = res.output
    assert out.count("via delta") == 4 and "4 devices, 4 online" in out, out[-3000:]
    assert sum(line.startswith("pi-") and "digits@2" in line for line in out.splitlines()) == 4, out[-3000:]
    assert "rollout 2: wave 2: 3 installed, 0 failed" in out
    # the loop: low-confidence requests captured on the agents, exported, built into v3, rolled out
    assert "capture export --reason low-confidence" in out and "rollout 3: wave 2: 3 installed, 0 failed" in out
    v1 = next(line for line in out.splitlines() if line.startswith("digits@1 "))
    assert float(v1.split()[4]) > 0.9, v1  # live accuracy of v1 from the field labels
    http_acc = [float(line.rsplit("accuracy ", 1)[1]) for line in out.splitlines() if "http://" in line and "digits, accuracy" in line]
    assert len(http_acc) == 4 and min(http_acc) > 0.95
    assert (tmp_path / "home" / "demo" / "fleet-report.html").is_file()
    import sqlite3

    db = sqlite3.connect(tmp_path / "home" / "demo" / "fleet" / "fleet.db")
    first = sorted(t for _, t in db.execute("SELECT device, MIN(t) FROM telemetry WHERE version = 1 GROUP BY device"))
    db.close()
    assert len(first) == 4 and first[1] - first[0] >= 2.0, first  # the canary ran v1 alone for seconds: visible
    import subprocess

    left = subprocess.run(["pgrep", "-f", str(tmp_path / "home" / "demo" / "fleet")], capture_output=True, text=True)
    assert left.stdout.strip() == "", "agent processes outlived the demo"


def test_demo_stops_its_processes_on_ctrl_c(tmp_path):
    """Ctrl-C while the demo's fleet is running: the agents and the broker go away with it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    home = tmp_path / "home"
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "--home", str(home), "demo", "--quick"],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    fleet = home / "demo" / "fleet"
    try:
        end = time.time() + 240
        while time.time() < end and "rollout 1: wave 1" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        running = subprocess.run(["pgrep", "-f", str(fleet)], capture_output=True, text=True).stdout.split()
        assert len(running) == 4, log.read_text()[-2000:]  # the 4 agents are up
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    left = subprocess.run(["pgrep", "-f", str(fleet)], capture_output=True, text=True).stdout.split()
    assert left == [], "agent processes outlived the demo"
