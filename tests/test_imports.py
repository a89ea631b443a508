"""The device side stays light: `import agent` and `edgeship --help` never pull in TensorFlow."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_py

HEAVY = ("tensorflow", "tf_keras", "tf2onnx", "tensorflow_model_optimization", "keras", "toolkit", "onnx")


def _modules(code: str) -> set[str]:
    out = run_py(code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))")
    return {m.split(".")[0] for m in json.loads(out.strip().splitlines()[-1])}


def _agent_modules() -> list[str]:
    """Every module of the agent package, found on disk (a new module is covered without editing this test)."""
    root = Path(__file__).resolve().parent.parent / "agent"
    return sorted(".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
                  for p in root.rglob("*.py"))


def test_import_agent_is_light():
    names = _agent_modules()
    assert {"agent.fleet.link", "agent.fleet.protocol", "agent.fleet.reporter", "agent.fleet.mqtt",
            "agent.fleet.outbox", "agent.fleet.delta", "agent.fleet.telemetry", "agent.serve.http"} <= set(names)
    code = "import importlib\n" + "".join(f"importlib.import_module({n!r})\n" for n in names)
    mods = _modules(code)
    assert not mods & set(HEAVY), mods & set(HEAVY)


def test_agent_runs_a_model_without_tensorflow(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    code = (f"from agent.runtime import load_model\nimport numpy as np\n"
            f"m = load_model({str(path)!r})\nprint(m.predict(np.array([[-1., 2., -3.]]))['y'].tolist())\n"
            "print(m.runtime)")
    out = run_py(code + "\nimport sys; print(sorted({m.split('.')[0] for m in sys.modules} & "
                 f"{set(HEAVY) - {'onnx'}!r}))")
    result, runtime, heavy = out.splitlines()[:3]
    assert result == "[[0.0, 2.0, 0.0]]"  # ReLU, computed
    assert runtime.startswith("onnxruntime") and heavy == "[]"


def test_cli_help_does_not_import_tensorflow():
    code = ("import sys\nfrom toolkit.cli import cli\ntry:\n    cli(['--help'], prog_name='edgeship')\n"
            "except SystemExit:\n    pass\nfor sub in ('build', 'profiles', 'bundle', 'models'):\n"
            "    try:\n        cli([sub, '--help'], prog_name='edgeship')\n    except SystemExit:\n        pass")
    mods = _modules(code)
    assert not mods & {"tensorflow", "tf_keras", "tf2onnx", "onnx", "onnxruntime", "matplotlib"}
