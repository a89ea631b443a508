"""deploy/container/: the Kubernetes manifests pass a schema check, the copies of the broker config agree,
the compose file gives every agent its own identity, and the host image's fleet tools need no TensorFlow.
(The images themselves are built and run in tests/test_container.py, `-m container`.)"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from conftest import ROOT, run_py

yaml = pytest.importorskip("yaml", reason="PyYAML not installed (dev extra)")
DEPLOY = ROOT / "deploy" / "container"
K8S = sorted(p for p in (DEPLOY / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_kubernetes_manifests_validate_against_the_schemas(path):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed (dev extra)")
    for doc in _docs(path):
        kv.validate(doc, "1.37.0", strict=True)  # raises on an unknown field, a wrong type, a missing name


def test_kubernetes_validation_catches_a_broken_manifest():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed (dev extra)")
    (sts,) = [d for d in _docs(DEPLOY / "k8s" / "collector.yaml") if d["kind"] == "StatefulSet"]
    sts["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []  # typo of volumeMounts
    with pytest.raises(kv.ValidationError):
        kv.validate(sts, "1.37.0", strict=True)


def test_kustomization_lists_every_manifest_but_the_job():
    kust = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in K8S if p.name != "rollout-job.yaml")


def test_broker_config_map_is_the_container_broker_config():
    (cm,) = _docs(DEPLOY / "k8s" / "broker-config.yaml")
    for name in ("mosquitto.conf", "acl.conf"):
        assert cm["data"][name] == (DEPLOY / "broker" / name).read_text()


def test_compose_agents_each_have_their_own_identity():
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    agents = {k: v for k, v in doc["services"].items() if k.startswith("agent-")}
    assert len(agents) >= 2
    ids = [a["environment"]["EDGESHIP_AGENT_DEVICE_ID"] for a in agents.values()]
    assert ids == list(agents) and len(set(ids)) == len(ids)
    for name, a in agents.items():
        env = a["environment"]
        assert env["EDGESHIP_AGENT_MQTT_USERNAME"] == name  # the ACL pins topics to username = device id
        assert f"{name}:/var/lib/edgeship" in a["volumes"] and name in doc["volumes"]
        assert any(v.endswith(":/etc/edgeship/keys:ro") for v in a["volumes"])
    ports = [a["ports"][0] for a in agents.values()]
    assert len(set(ports)) == len(ports)


def test_host_image_extras_and_fleet_tools_need_no_tensorflow():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for extra in ("agent", "fleet"):  # what build.sh installs into the agent and host images
        deps = " ".join(project["dependencies"] + project["optional-dependencies"][extra]).lower()
        assert "tensorflow" not in deps and "tf-keras" not in deps and "mlflow" not in deps
    code = ("import sys\nfrom toolkit.cli import cli\n"
            "import toolkit.fleet.collector, toolkit.fleet.rollout, toolkit.fleet.publish, toolkit.fleet.views\n"
            "for args in (['fleet', '--help'], ['rollout', 'start', '--help'], ['publish', '--help']):\n"
            "    try:\n        cli(args)\n    except SystemExit:\n        pass\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'tf_keras', 'onnx', 'mlflow'}))")
    assert run_py(code).strip().splitlines()[-1] == "[]"


def test_agent_unit_is_valid_systemd_and_runs_as_a_dynamic_user(tmp_path):
    """deploy/edgeship-agent.service: every directive known to this systemd (systemd-analyze verify), a dynamic
    user with a private state folder, the private keys handed over as credentials."""
    import shutil
    import subprocess

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    text = (ROOT / "deploy" / "edgeship-agent.service").read_text()
    for line in ("DynamicUser=yes", "StateDirectory=edgeship", "StateDirectoryMode=0700",
                 "LoadCredential=model.key:/etc/edgeship/model.key", "Environment=EDGESHIP_AGENT_MODEL_KEY=%d/model.key"):
        assert line in text.splitlines(), line
    unit = tmp_path / "edgeship-agent.service"
    unit.write_text(text.replace("/opt/edgeship/venv/bin/edgeship-agent", shutil.which("true") or "/bin/true"))
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and str(unit) not in res.stderr, res.stderr
