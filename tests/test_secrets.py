"""Secrets: private keys are created only by us, 0600, never through a planted link or a leftover file;
passwords come from a file or the environment and are never printed."""

from __future__ import annotations

import os
import stat

import pytest
from click.testing import CliRunner

from agent.errors import ConfigError

from agentproc import run_cli
from toolkit.cli import cli
from toolkit.signing import generate_key, load_key


def test_key_generation_ignores_leftovers_and_planted_links(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    leftover = keys / ".signing.key.tmp"  # the fixed temp name earlier versions used, left world-readable
    leftover.write_text("old")
    leftover.chmod(0o644)
    target = tmp_path / "elsewhere.pem"
    (keys / "signing.key").symlink_to(target)  # a dangling link planted where the key goes
    k = generate_key(keys / "signing.key")
    st = os.lstat(keys / "signing.key")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert not target.exists()  # the key did not follow the link
    assert load_key(keys / "signing.key").public_raw == k.public_raw
    assert sorted(p.name for p in keys.iterdir()) == [".signing.key.tmp", "signing.key", "signing.pub"]
    assert leftover.read_text() == "old"  # never reused


def test_key_generation_under_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        generate_key(tmp_path / "k" / "signing.key")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k" / "signing.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700


def test_passwords_are_never_echoed(tmp_path, settings, signing_key):
    secret = "hunter2-very-secret"
    for url in (f"mqtt://edge:{secret}@", f"mqtt://edge:{secret}@host:notaport", f"ftp://edge:{secret}@host"):
        res = CliRunner().invoke(cli, ["--home", str(settings.home), "fleet", "devices", "--broker", url])
        assert res.exit_code == 1 and secret not in res.output and "edge:***@" in res.output, res.output
        conf = tmp_path / "agent.toml"
        conf.write_text(f'[agent]\nstate_dir = "{tmp_path / "st"}"\nkeyring = "{settings.keyring_path}"\n'
                        f'[http]\nport = 0\n[mqtt]\nbroker = "{url}"\n')
        res = run_cli("run", "--config", conf, timeout=60)
        assert res.returncode == 1 and secret not in res.stdout + res.stderr and "edge:***@" in res.stderr, res
    conf.write_text(f'[agent]\nstate_dir = "{tmp_path / "st"}"\nkeyring = "{settings.keyring_path}"\n'
                    f'[mqtt]\nbroker = "mqtt://h"\npassword = 12345678\n')
    res = run_cli("run", "--config", conf, timeout=60)
    assert res.returncode == 1 and "12345678" not in res.stdout + res.stderr and "expected str, got int" in res.stderr


def test_password_file(tmp_path):
    from agent.config import load_config

    pw = tmp_path / "mqtt.pw"
    pw.write_text("s3cret\n")
    conf = tmp_path / "agent.toml"
    conf.write_text(f'[mqtt]\nbroker = "mqtt://h"\npassword_file = "{pw}"\n')
    cfg = load_config(conf, env={})
    assert cfg.mqtt_password == "s3cret" and "s3cret" not in repr(cfg)
    cfg = load_config(None, env={"EDGESHIP_AGENT_MQTT_PASSWORD_FILE": str(pw)})
    assert cfg.mqtt_password == "s3cret"
    with pytest.raises(ConfigError, match="both set"):
        load_config(conf, env={"EDGESHIP_AGENT_MQTT_PASSWORD": "x"})
    pw.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(conf, env={})
