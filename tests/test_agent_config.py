"""Agent configuration: precedence flag > env > file > default, and clear errors."""

from __future__ import annotations

import pytest

from agent.config import load_config
from agent.errors import ConfigError

pytestmark = pytest.mark.device


def test_precedence(tmp_path):
    f = tmp_path / "agent.toml"
    f.write_text('[agent]\nstate_dir = "/file/state"\nthreads = 2\ndevice_id = "pi-1"\n[http]\nport = 9000\n')
    cfg = load_config(f, flags={"http_port": 9100}, env={"EDGESHIP_AGENT_THREADS": "3"})
    assert cfg.http_port == 9100 and cfg.threads == 3 and str(cfg.state_dir) == "/file/state"
    assert cfg.device_id == "pi-1" and cfg.http_host == "127.0.0.1" and cfg.max_body_bytes == 16 << 20
    assert load_config(None, env={}).http_port == 8080
    serve = load_config(None, env={"EDGESHIP_AGENT_MAX_SEQUENCES": "4", "EDGESHIP_AGENT_READ_TIMEOUT": "2.5"})
    assert (serve.max_sequences, serve.read_timeout, serve.max_connections, serve.interpreters) == (4, 2.5, 128, None)
    from pathlib import Path

    assert load_config(None, flags={"state_dir": Path("/x")}, env={}).state_dir == Path("/x")


@pytest.mark.parametrize("text, match", [
    ('[http]\nport = "eighty"\n', r"http.port: expected int, got 'eighty'"),
    ("[agent]\nthreads = 0\n", r"agent.threads: must be positive"),
    ("[agent\n", "not valid TOML"),
    ("[http]\nmax_connections = 0\n", r"http.max_connections: must be positive"),
    ("[http]\nread_timeout = -1\n", r"http.read_timeout: must be positive"),
    ("[agent]\ninterpreters = 0\n", r"agent.interpreters: must be positive"),
    ('[agent]\nsequence_idle_timeout = "long"\n', r"agent.sequence_idle_timeout: expected float"),
])
def test_errors_name_file_and_key(tmp_path, text, match):
    f = tmp_path / "agent.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as exc:
        load_config(f, env={})
    assert str(f) in str(exc.value)
    with pytest.raises(ConfigError, match="EDGESHIP_AGENT_HTTP_PORT: expected int"):
        load_config(None, env={"EDGESHIP_AGENT_HTTP_PORT": "x"})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml", env={})


def test_capture_is_off_unless_enabled_and_checked(tmp_path):
    assert load_config(None, env={}).capture.enabled is False
    conf = tmp_path / "agent.toml"
    conf.write_text("[capture]\nenabled = true\nrate = 0.01\nlow_confidence = 0.6\nbudget_bytes = 1000\n")
    cap = load_config(conf, env={}).capture
    assert (cap.enabled, cap.rate, cap.low_confidence, cap.budget_bytes, cap.sampling) == (True, 0.01, 0.6, 1000, True)
    assert load_config(conf, env={"EDGESHIP_AGENT_CAPTURE_ENABLED": "false"}).capture.enabled is False
    for text, match in [("enabled = 1", "capture.enabled: expected bool"), ("rate = 1.5", r"capture.rate: must be in \[0, 1\]"),
                        ("low_confidence = -0.1", "capture.low_confidence"), ("queue_max = 0", "capture.queue_max"),
                        ("budget_bytes = -1", "capture.budget_bytes"), ("rate = \"often\"", "capture.rate: expected float")]:
        conf.write_text(f"[capture]\n{text}\n")
        with pytest.raises(ConfigError, match=match):
            load_config(conf, env={})
    with pytest.raises(ConfigError, match="EDGESHIP_AGENT_CAPTURE_ENABLED"):
        load_config(None, env={"EDGESHIP_AGENT_CAPTURE_ENABLED": "perhaps"})
