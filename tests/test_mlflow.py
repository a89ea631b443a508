"""MLflow, against a real local tracking store: build from a registered model (models:/) and from run
artifacts (runs:/), log the build as a run, and read it back through MLflow's own client."""

from __future__ import annotations

import hashlib
import json

import pytest
from click.testing import CliRunner

from conftest import run_py

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed: pip install -e '.[mlflow]'")

from toolkit.cli import cli  # noqa: E402
from toolkit.errors import MlflowError  # noqa: E402
from toolkit.mlflow_link import BuildLog, fetch_model, find_model  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory, digits):
    """A SQLite tracking store and model registry holding the digits model twice: as MLflow's
    tensorflow flavour (registered as 'digits') and as a plain .keras artifact ('digits-plain')."""
    pytest.importorskip("pandas", reason="MLflow's model flavours need pandas (in the dev extra)")
    import mlflow.tensorflow

    from toolkit.tfenv import import_keras

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    from toolkit.mlflow_link import _mlflow

    _mlflow(uri)  # same environment as the toolkit uses (telemetry off)
    client = mlflow.MlflowClient()
    for name in ("training", "edge"):  # artifacts under tmp, not MLflow's default ./mlruns in the cwd
        client.create_experiment(name, artifact_location=(folder / name).as_uri())
    model = import_keras().models.load_model(str(digits["model"]), compile=False)
    mlflow.set_experiment("training")
    with mlflow.start_run() as run:
        mlflow.tensorflow.log_model(model, name="model", registered_model_name="digits", pip_requirements=[])
        mlflow.log_artifact(str(digits["model"]), "plain")
    client.create_registered_model("digits-plain")
    client.create_model_version("digits-plain", f"{run.info.artifact_uri}/plain", run_id=run.info.run_id)
    return {"uri": uri, "run_id": run.info.run_id}


def _cli(*args, env=None):
    return CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False, env=env)


def test_build_from_registry_is_logged_as_a_run(store, digits, tmp_path):
    out, home = tmp_path / "dist", tmp_path / "home"
    res = _cli("--home", home, "build", "models:/digits/1", "-p", "x86_64-onnx", "--validation",
               digits["validation"], "--calibration", digits["calibration"], "--meta", digits["meta"], "-o", out,
               "--quick", "--json", "--mlflow", store["uri"], "--mlflow-experiment", "edge")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["name"] == "digits"  # the registered model's name, not the file's ("model")
    origin = summary["provenance"]["source"]["origin"]
    assert origin["uri"] == "models:/digits/1" and origin["model_version"] == "1"
    assert origin["run_id"] == store["run_id"] and origin["file"].endswith("model.keras")
    (prof,) = summary["profiles"]
    bundle = out / "digits-v1-x86_64-onnx.bundle"
    from agent.bundle import inspect_bundle

    manifest, _ = inspect_bundle(bundle)
    assert manifest["provenance"]["source"]["origin"] == origin  # signed into the bundle

    client = mlflow.MlflowClient()
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "edge"
    p = run.data.params
    assert p["source"] == "models:/digits/1" and p["model"] == "digits" and p["version"] == "1"
    assert p["x86_64-onnx/runtime"] == "onnxruntime" and "int8" in p["x86_64-onnx/precisions"].split(",")
    assert float(p["x86_64-onnx/max_accuracy_drop"]) > 0 and float(p["x86_64-onnx/max_model_mb"]) > 0
    assert p["build/latency"] == "quick" and p["build/validation"] == digits["validation"].name
    m = run.data.metrics
    for v in prof["variants"]:
        if v["size_bytes"]:
            key = f"x86_64-onnx/{v['runtime']}/{v['precision']}"
            assert m[f"{key}/size_mb"] == pytest.approx(v["size_bytes"] / 1e6)
            assert m[f"{key}/p95_ms"] == pytest.approx(v["latency"]["p95_ms"])
            assert m[f"{key}/peak_rss_mb"] == pytest.approx(v["latency"]["peak_rss_mb"])
            assert m[f"{key}/accuracy_drop_points"] == pytest.approx(v["metrics"]["accuracy_drop_points"])
            assert m[f"{key}/chosen"] == float(v["chosen"])
    assert run.data.tags["edgeship.chosen.x86_64-onnx"] == f"{prof['chosen_runtime']}/{prof['chosen']}"
    assert run.data.tags["edgeship.source.model_version"] == "1"
    arts = {a.path for folder in ("build", "bundles") for a in client.list_artifacts(run.info.run_id, folder)}
    assert arts == {"build/digits-v1.json", "build/digits-v1.html", "bundles/digits-v1-x86_64-onnx.bundle"}
    got = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=f"bundles/{bundle.name}",
                                              dst_path=str(tmp_path / "dl"))
    assert hashlib.sha256(open(got, "rb").read()).hexdigest() == prof["bundle_sha256"]


def test_sources_from_registry_and_run_artifacts(store, tmp_path):
    """A plain artifact registered as a model version, a file inside a run, and an ONNX flavour folder."""
    import onnx
    from onnx import TensorProto, helper

    got = fetch_model("models:/digits-plain/latest", store["uri"], tmp_path / "a")
    assert got.path.name == "digits.keras" and got.name == "digits-plain"
    assert got.origin["model_version"] == "1"  # "latest" (and an alias) are pinned to the version downloaded
    got = fetch_model(f"runs:/{store['run_id']}/plain/digits.keras", store["uri"], tmp_path / "b")
    assert got.path.is_file() and got.origin == {"uri": f"runs:/{store['run_id']}/plain/digits.keras",
                                                  "run_id": store["run_id"], "file": "digits.keras"}
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])])
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("training").experiment_id) as run:
        mlflow.onnx.log_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), name="relu",
                              pip_requirements=[])
    got = fetch_model(f"runs:/{run.info.run_id}/relu", store["uri"], tmp_path / "c")
    assert got.path.name == "model.onnx" and onnx.load(str(got.path)).graph.node[0].op_type == "Relu"


def test_build_log_in_a_plain_folder_store(digits_build, tmp_path):
    """A folder is a tracking store too (no server, no database): every profile's variants are logged,
    and a failed build is a FAILED run that says why."""
    folder = tmp_path / "mlruns"
    summary = digits_build.to_dict()
    profiles = [p.profile.summary() for p in digits_build.profiles]
    log = BuildLog(str(folder), "edgeship")
    rid = log.record(summary, profiles, {"quick": True}, {"build": []})
    failed = log.record(summary, profiles, {}, {}, failed="no variant passed the validation gate for: x")
    assert (folder / log.experiment_id / rid / "meta.yaml").is_file()
    client = mlflow.MlflowClient(tracking_uri=folder.resolve().as_uri())
    run = client.get_run(rid)
    for p in summary["profiles"]:
        assert run.data.tags[f"edgeship.chosen.{p['profile']}"] == f"{p['chosen_runtime']}/{p['chosen']}"
        assert run.data.tags[f"edgeship.bundle_sha256.{p['profile']}"] == p["bundle_sha256"]
        assert run.data.params[f"{p['profile']}/objective"]
        for v in p["variants"]:
            if v["passed"]:
                assert run.data.metrics[f"{p['profile']}/{v['runtime']}/{v['precision']}/p50_ms"] == pytest.approx(
                    v["latency"]["p50_ms"])
    bad = client.get_run(failed)
    assert bad.info.status == "FAILED" and "validation gate" in bad.data.tags["edgeship.failed"]


def test_find_model_refuses_what_it_cannot_build(tmp_path):
    two = tmp_path / "two"
    (two / "a").mkdir(parents=True)
    (two / "a" / "m.onnx").write_bytes(b"x")
    (two / "m.keras").write_bytes(b"x")
    with pytest.raises(MlflowError, match=r"runs:/r/x: 2 models in the artifact \(a/m.onnx, m.keras\); point at "
                                          r"one, e.g. runs:/r/x/a/m.onnx"):
        find_model(two, "runs:/r/x")
    (tmp_path / "none").mkdir()
    with pytest.raises(MlflowError, match="no model in the artifact"):
        find_model(tmp_path / "none", "runs:/r/y")
    sk = tmp_path / "sk"
    sk.mkdir()
    (sk / "MLmodel").write_text("flavors:\n  sklearn: {pickled_model: model.pkl}\n  python_function: {}\n")
    with pytest.raises(MlflowError, match="flavour.*python_function, sklearn; edgeship builds onnx"):
        find_model(sk, "models:/sk/1")
    (sk / "MLmodel").write_text("flavors:\n  onnx: {data: ../two/m.keras}\n")
    with pytest.raises(MlflowError, match="not inside the downloaded model"):
        find_model(sk, "models:/sk/1")


def test_cli_errors_are_clean(store, digits, tmp_path):
    args = ["--home", tmp_path, "build", "-p", "x86_64-onnx", "--validation", digits["validation"], "-o", tmp_path,
            "--mlflow-experiment", "edge"]
    res = _cli(*args[:3], "models:/digits/1", *args[3:], env={"MLFLOW_TRACKING_URI": None})
    assert res.exit_code == 2 and "--mlflow URI or MLFLOW_TRACKING_URI" in res.output
    res = _cli(*args[:3], "models:/nope/3", *args[3:], "--mlflow", store["uri"])
    assert res.exit_code == 1 and "models:/nope/3: cannot resolve in MLflow at sqlite:" in res.output
    assert "Traceback" not in res.output
    (tmp_path / "a-file").write_text("")
    res = _cli(*args[:3], "models:/digits/1", *args[3:], "--mlflow", f"sqlite:///{tmp_path}/a-file/x.db")
    assert res.exit_code == 1 and "cannot open experiment 'edge'" in res.output
    assert not list(tmp_path.glob("*.bundle"))


def test_help_and_import_never_load_mlflow():
    out = run_py("import sys, toolkit, toolkit.mlflow_link\nfrom toolkit.cli import cli\n"
                 "try:\n    cli(['build', '--help'])\nexcept SystemExit:\n    pass\n"
                 "print('mlflow' in sys.modules)")
    assert out.strip().splitlines()[-1] == "False"
