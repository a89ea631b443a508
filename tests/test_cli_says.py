"""The CLIs say what they do: every option explained with its default shown one way, read-only commands
need no key or broker, profiles print their TOML keys, native log lines stay out of the output, files that
are not secrets are readable, one place for device runtimes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from agent.cli import cli as agent_cli
from toolkit.cli import cli

ROOT = Path(__file__).resolve().parent.parent
NATIVE_NOISE = ("I0000", "absl::InitializeLog", "oneDNN", "cudart", "XNNPACK delegate", "TensorFlow Lite")


def _commands(group: click.Group, path: list[str]):
    yield path, group
    for name, sub in group.commands.items():
        if isinstance(sub, click.Group):
            yield from _commands(sub, path + [name])
        else:
            yield path + [name], sub


@pytest.mark.parametrize("root,name", [(cli, "edgeship"), (agent_cli, "edgeship-agent")])
def test_every_option_has_help_and_shows_its_default_one_way(root, name):
    problems = []
    for path, cmd in _commands(root, [name]):
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.name in ("help", "version"):
                continue
            where = f"{' '.join(path)} {'/'.join(p.opts)}"
            if not p.help:
                problems.append(f"{where}: no help text")
            elif re.search(r"default[: ]", p.help, re.I):
                problems.append(f"{where}: the default is in the help text, not show_default")
            has_default = p.default is not None and "UNSET" not in repr(p.default) and not p.is_flag
            if has_default and not p.multiple and not p.required and not p.show_default:
                problems.append(f"{where}: default {p.default!r} not shown")
    assert problems == []


def test_profiles_show_prints_the_toml_keys_the_docs_list(tmp_path):
    from toolkit.profiles import TOML_KEYS, load_profile_file

    rows = re.findall(r"^\| (`[^|]+)\|", (ROOT / "docs" / "profiles.md").read_text(), re.M)  # the key column
    documented = {k for row in rows for k in re.findall(r"`([a-z_.0-9]+)`", row)}
    assert set(TOML_KEYS.values()) <= documented, set(TOML_KEYS.values()) - documented
    for name in ("rpi3-armv7", "x86_64-onnx", "coral-edgetpu"):
        res = CliRunner().invoke(cli, ["--home", str(tmp_path / "h"), "profiles", "show", name])
        assert res.exit_code == 0, res.output
        assert "max_accuracy_drop" not in res.output and "runtime_version" not in res.output  # internal names
        copy = tmp_path / f"{name}.toml"  # what it prints is a profile: it loads back to the same one
        copy.write_text(res.output)
        original = load_profile_file(ROOT / "device_profiles" / f"{name}.toml")
        assert load_profile_file(copy).toml_doc() == original.toml_doc()
    doc = json.loads(CliRunner().invoke(cli, ["--home", str(tmp_path / "h"), "profiles", "show", "rpi3-armv7",
                                              "--json"]).output)
    assert doc["runtime"]["name"] == "tflite-runtime" and doc["runtime"]["numpy"] == "<2"
    assert doc["budgets"]["p95_latency_ms"] > 0 and doc["accuracy"]["max_drop_points"] == 1.0


def test_rollout_status_and_abort_need_no_key_and_no_broker(tmp_path):
    from toolkit.fleet.rollout import Rollouts

    home = tmp_path / "fresh"  # no signing key here
    res = CliRunner().invoke(cli, ["--home", str(home), "rollout", "status"])
    assert res.exit_code == 1 and "no registry there" in res.output and not home.exists(), res.output
    home.mkdir()
    ro = Rollouts(home / "registry.db")  # a rollout left running by a driver on another machine
    with ro.db:
        ro.db.execute("INSERT INTO rollouts (created, updated, fleet, grp, bundle, model, version, sha256, size, "
                      "state, plan, error) VALUES (0, 0, 'f', 'g', 'b', 'digits', 2, 's', 1, 'running', ?, '')",
                      (json.dumps({"waves": [["pi-1"]], "wave": 0, "results": {}}),))
    ro.db.close()
    res = CliRunner().invoke(cli, ["--home", str(home), "rollout", "status", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)[0]["state"] == "running", res.output
    res = CliRunner().invoke(cli, ["--home", str(home), "rollout", "abort", "1"])
    assert res.exit_code == 0 and "aborted" in res.output, res.output
    assert not (home / "keys").exists()  # no key was needed, none was made
    res = CliRunner().invoke(cli, ["--home", str(home), "rollout", "status", "--broker", "mqtt://x:1"])
    assert res.exit_code == 2  # it takes no broker: says so instead of ignoring it


def test_native_log_lines_stay_out_of_the_output(tmp_path, digits, fleet_bundles, settings):
    """TensorFlow/absl print `I0000 … oneDNN …` when imported and LiteRT `INFO: Created TensorFlow Lite
    XNNPACK delegate` on its first model: the CLI's output (both streams) has only its own lines."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("EDGESHIP_DEBUG", None)
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a model")
    home = tmp_path / "h"
    proc = subprocess.run([sys.executable, "-m", "toolkit.cli", "--home", str(home), "build", str(bad),
                           "-p", "rpi4-arm64", "--validation", str(digits["validation"])], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 1 and "cannot load as keras model" in proc.stderr, proc.stderr  # after TF's import
    assert not [n for n in NATIVE_NOISE if n in proc.stdout + proc.stderr], proc.stderr
    proc = subprocess.run([sys.executable, "-m", "toolkit.cli", "--home", str(home), "bundle", "verify",
                           str(fleet_bundles["v1"]), "--keyring", str(settings.keyring_path)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and "golden set OK" in proc.stdout, proc.stderr
    assert not [n for n in NATIVE_NOISE if n in proc.stdout + proc.stderr], proc.stderr
    assert "XNNPACK" in (home / "native.log").read_text()  # it went here, for whoever needs it


def test_bundles_and_reports_are_readable_by_others_as_the_umask_says(tmp_path, fleet_bundles, signing_key):
    from agent.store import atomic_write
    from test_install import rebundle

    old = os.umask(0o027)
    try:
        b = rebundle(fleet_bundles["v1"], tmp_path / "b.bundle", signing_key)
        atomic_write(tmp_path / "report.html", b"<p>", public=True)
        atomic_write(tmp_path / "state.json", b"{}")
    finally:
        os.umask(old)
    assert b.stat().st_mode & 0o777 == 0o640 and (tmp_path / "report.html").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "state.json").stat().st_mode & 0o777 == 0o600  # state stays private


def test_device_runtimes_live_in_one_place(tmp_path, monkeypatch):
    from toolkit.settings import Settings

    monkeypatch.delenv("EDGESHIP_RUNTIMES", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    s = Settings.resolve(str(tmp_path / "h1"))
    assert s.runtime_env("tflite-runtime", "2.14.0") == Path.home() / ".cache/edgeship/runtimes/tflite-runtime-2.14.0"
    assert Settings(tmp_path / "h2").runtimes == s.runtimes  # another HOME (e.g. the tests'): the same cache
    monkeypatch.setenv("EDGESHIP_RUNTIMES", str(tmp_path / "rt"))
    ready = tmp_path / "rt" / "litert-2.3.0"
    (ready / "bin").mkdir(parents=True)
    (ready / "bin" / "python").write_text("")
    (ready / ".ready").write_text("ai-edge-litert==2.3.0\n")
    res = CliRunner().invoke(cli, ["--home", str(tmp_path / "h3"), "runtimes", "list"])
    assert res.exit_code == 0 and str(ready / "bin" / "python") in res.output, res.output
    ci = (ROOT / ".ci" / "run").read_text()
    assert "runtimes install rpi3-armv7" in ci and ".edgeship/runtimes" not in (ROOT / "docs" / "profiles.md").read_text()


def test_latency_for_people():
    from toolkit.units import fmt_ms

    assert [fmt_ms(x) for x in (0.0012, 0.25, 3.456, 250.0, None)] == ["1.2 µs", "250 µs", "3.46 ms", "250 ms", "-"]
