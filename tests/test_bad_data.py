"""Bad data never ships a model: labels the model cannot predict, a reference accuracy no better than
chance, a .npy instead of an .npz, pruning that did not prune, and registry versions taken only by
builds that wrote a bundle."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import ROOT
from toolkit.build.pipeline import build
from toolkit.cli import cli
from toolkit.errors import FineTuningError, InputError, RegistryError
from toolkit.registry import Registry


@pytest.fixture(scope="module")
def fp32_only(tmp_path_factory, profile):
    """rpi4-arm64 with fp32 only: one variant, so a whole build through the gate stays cheap."""
    d = tmp_path_factory.mktemp("prof")
    text = profile("rpi4-arm64").path.read_text().replace('name = "rpi4-arm64"', 'name = "rpi4-fp32"')
    (d / "rpi4-fp32.toml").write_text(text.replace('accepted = ["int8", "fp16", "fp32", "dynamic-int8"]',
                                                   'accepted = ["fp32"]'))
    return d / "rpi4-fp32.toml"


def _relabelled(digits, tmp_path, name, f):
    with np.load(digits["validation"]) as v:
        x, y = v["image"], v["y"]
    np.savez(tmp_path / name, image=x, y=f(y))
    return tmp_path / name


def test_labels_outside_the_models_classes_are_refused_before_building(make_options, digits, tmp_path):
    val = _relabelled(digits, tmp_path, "val20.npz", lambda y: y + 20)
    with pytest.raises(InputError, match=r"validation data .*val20.npz: labels y range 20..29, but output "
                                         r"'probs' has 10 classes \(0..9\); \d+ of \d+ labels are outside"):
        build(make_options(tmp_path / "d", ["rpi4-arm64"], validation=val))
    with np.load(digits["train"]) as t:
        np.savez(tmp_path / "train.npz", image=t["image"][:50], y=np.full(50, -1))
    with pytest.raises(InputError, match=r"training data .*labels y range -1..-1"):  # before any pruning
        build(make_options(tmp_path / "d", ["rpi4-arm64"], train=tmp_path / "train.npz", prune=0.5))
    assert not (tmp_path / "d").exists()


def test_reference_below_chance_fails_the_gate_and_takes_no_version(digits, fp32_only, tmp_path):
    """Labels shifted by one class: the fp32 reference scores ~0, every variant 'drops' 0 points; the gate
    must refuse, the table say why, and the failed build neither register a version nor name files after one."""
    home, out = tmp_path / "home", tmp_path / "out"
    shifted = _relabelled(digits, tmp_path, "shifted.npz", lambda y: (y + 1) % 10)
    args = ["--home", str(home), "build", str(digits["model"]), "-p", str(fp32_only), "--quick", "-o", str(out)]
    res = CliRunner().invoke(cli, [*args, "--validation", str(shifted)])
    assert res.exit_code == 1, res.output
    assert "no bundle [rpi4-fp32]: no variant passed the validation gate" in res.output
    assert "Error: no bundle for 1 of 1 profile(s): rpi4-fp32 (see above)" in res.output
    row = next(line for line in res.output.splitlines() if line.startswith("rpi4-fp32") and "fp32" in line)
    assert "FAIL: fp32 reference accuracy 0.0" in row and "< 0.1000 (chance for 10 classes)" in row, row
    assert not list(out.glob("*.bundle")) and not list(out.glob("digits-v*"))
    failed = sorted(p.name for p in out.glob("digits-failed-*"))
    assert len(failed) == 2 and failed[0].endswith(".html") and failed[1].endswith(".json"), failed
    assert json.loads((out / failed[1]).read_text())["version"] is None
    assert "failed build (no version registered)" in (out / failed[0]).read_text()
    reg = Registry(home / "registry.db")
    assert reg.models() == [] and reg.next_version("digits") == 1
    reg.close()
    res = CliRunner().invoke(cli, [*args, "--validation", str(digits["validation"]),
                                   "--min-reference-accuracy", "0.999"])  # a floor set above what it reaches
    assert res.exit_code == 1 and "< 0.9990 (--min-reference-accuracy)" in res.output, res.output
    res = CliRunner().invoke(cli, [*args, "--validation", str(digits["validation"])])
    assert res.exit_code == 0, res.output
    assert (out / "digits-v1-rpi4-fp32.bundle").is_file() and (out / "digits-v1.json").is_file()
    res = CliRunner().invoke(cli, [*args, "--validation", str(digits["validation"]), "--version", "1"])
    assert res.exit_code == 1 and "--version 1: digits v1 for rpi4-fp32 is already registered" in res.output


def test_npy_validation_file_is_a_one_line_error(digits, tmp_path):
    with np.load(digits["validation"]) as v:
        np.save(tmp_path / "x.npy", v["image"])
    res = CliRunner().invoke(cli, ["--home", str(tmp_path / "h"), "build", str(digits["model"]), "-p", "rpi4-arm64",
                                   "--validation", str(tmp_path / "x.npy"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and res.exception.__class__ is SystemExit, res.output
    lines = [x for x in res.output.strip().splitlines() if not x.startswith("[")]  # not progress lines
    assert len(lines) == 1 and lines[0].startswith("Error: validation data") and "x.npy" in lines[0], res.output
    assert "a .npy file holds one unnamed array; give an .npz" in lines[0] and "Traceback" not in res.output


def test_prune_below_the_requested_sparsity_fails_with_the_reason(make_options, digits, tmp_path):
    with np.load(digits["train"]) as t:
        np.savez(tmp_path / "few.npz", image=t["image"][:64], y=t["y"][:64])  # 2 steps: no mask update
    with pytest.raises(FineTuningError, match=r"--prune 0.5: only 0.0% of kernel weights are zero after 1 "
                                              r"epoch\(s\) \(2 steps; .*below the requested 50%"):
        build(make_options(tmp_path / "d", ["rpi4-arm64"], train=tmp_path / "few.npz", prune=0.5, epochs=1))
    assert not list(tmp_path.glob("d/*.bundle"))


RESERVE = """
import json, sys
from toolkit.registry import Registry
reg = Registry(sys.argv[1])
print(json.dumps([reg.reserve("m", "p") for _ in range(int(sys.argv[2]))]))
"""


def test_concurrent_builds_never_take_the_same_version(tmp_path):
    db = tmp_path / "registry.db"
    Registry(db).close()
    procs = [subprocess.Popen([sys.executable, "-c", RESERVE, str(db), "25"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(4)]
    got = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        got += json.loads(out)
    assert sorted(got) == list(range(1, 101))  # 100 reservations from 4 processes: all distinct
    reg = Registry(db)
    reg.record(model="m", version=7, profile="p", variant="fp32", fmt="tflite", size_bytes=1, bundle_path="/b",
               bundle_sha256="0" * 64, metrics={})
    with pytest.raises(RegistryError, match=r"m v7 for p is already registered \(/b\)"):
        reg.reserve("m", "p", 7)
    with pytest.raises(RegistryError, match="m v8 for p is being written by another build"):
        reg.reserve("m", "p", 8)
    assert reg.reserve("m", "other-profile", 8) == 8  # the same version for another profile of that build
    reg.release("m", 100, "p")
    assert reg.next_version("m") == 100  # a released version (bundle not written) is free again
    reg.close()
