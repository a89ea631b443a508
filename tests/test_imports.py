"""The device side stays light: `import agent` and `edgeship --help` never pull in TensorFlow."""

from __future__ import annotations

import json

from conftest import run_py

HEAVY = ("tensorflow", "tf_keras", "tf2onnx", "tensorflow_model_optimization", "keras", "toolkit", "onnx")


def _modules(code: str) -> set[str]:
    out = run_py(code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))")
    return {m.split(".")[0] for m in json.loads(out.strip().splitlines()[-1])}


def test_import_agent_is_light():
    mods = _modules("import agent, agent.bundle, agent.keys, agent.manifest, agent.runtime, agent.golden, "
                    "agent.install, agent.serve.service, agent.serve.http, agent.config, agent.cli, agent.device, "
                    "agent.doctor")
    assert not mods & set(HEAVY), mods & set(HEAVY)


def test_agent_runs_a_model_without_tensorflow(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    code = (f"from agent.runtime import load_model\nimport numpy as np\n"
            f"m = load_model({str(path)!r})\nprint(m.predict(np.array([[-1., 2., -3.]]))['y'].tolist())")
    out = run_py(code + "\nimport sys; print(sorted({m.split('.')[0] for m in sys.modules} & "
                 f"{set(HEAVY) - {'onnx'}!r}))")
    assert out.splitlines()[0] == "[[0.0, 2.0, 0.0]]"
    assert out.splitlines()[1] == "[]"
    assert np.isfinite(1.0)


def test_cli_help_does_not_import_tensorflow():
    code = ("import sys\nfrom toolkit.cli import cli\ntry:\n    cli(['--help'], prog_name='edgeship')\n"
            "except SystemExit:\n    pass\nfor sub in ('build', 'profiles', 'bundle', 'models'):\n"
            "    try:\n        cli([sub, '--help'], prog_name='edgeship')\n    except SystemExit:\n        pass")
    mods = _modules(code)
    assert not mods & {"tensorflow", "tf_keras", "tf2onnx", "onnx", "onnxruntime", "matplotlib"}
