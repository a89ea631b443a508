"""MLflow, where many users already track their models (optional extra ``edgeship[mlflow]``).

- ``fetch_model``: a ``models:/NAME/VERSION`` (or ``models:/NAME@alias``) or ``runs:/RUN_ID/path`` source is
  downloaded to a folder and the model file inside it is found: an MLflow model folder's ``MLmodel`` names
  the flavour's data path (onnx, tensorflow/keras, tflite); otherwise the one model file in the artifact.
- ``BuildLog``: one MLflow run per build: parameters (options, each profile's runtime, precisions,
  tolerances and budgets), metrics per variant (``PROFILE/[RUNTIME/]PRECISION/NAME``), the chosen variant
  per profile (tags) and artifacts (summary JSON, HTML report, bundles).

A local SQLite URI (``sqlite:///mlflow.db``) or folder (``./mlruns``, ``file:///path``) needs no server.
MLflow is imported inside these functions, so ``edgeship --help`` and ``import toolkit`` never load it;
its exceptions become :class:`MlflowError` here, once.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from toolkit.errors import MlflowError

log = logging.getLogger(__name__)

SCHEMES = ("models:/", "runs:/")
FLAVORS = ("onnx", "tensorflow", "keras", "tflite")  # MLmodel flavours whose data edgeship can build
MODEL_SUFFIXES = (".keras", ".h5", ".hdf5", ".onnx", ".tflite")
VARIANT_METRICS = ("accuracy", "reference_accuracy", "accuracy_drop_points", "top1_agreement", "snr_db",
                   "max_abs_error")
LATENCY_METRICS = ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "init_ms", "peak_rss_mb", "device_p95_ms_est")
PROFILE_PARAMS = ("arch", "runtime", "runtime_version", "precisions", "objective", "threads", "max_accuracy_drop",
                  "min_agreement", "min_snr_db", "max_model_mb", "max_ram_mb", "max_p95_ms", "device_slowdown")
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))?/?$")
_RUN_URI = re.compile(r"^runs:/(?P<run>[^/]+)(?:/(?P<path>.*))?$")


def is_mlflow_uri(source: str) -> bool:
    return source.startswith(SCHEMES)


def tracking_uri(uri: str) -> str:
    """A URI MLflow understands: a plain folder becomes an absolute ``file://`` URI."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri) and not re.match(r"^[A-Za-z]:[\\/]", uri):
        return uri
    return Path(uri).expanduser().resolve().as_uri()


def _mlflow(uri: str) -> Any:
    """Import MLflow for a tracking store at ``uri`` (a build never phones home: MLflow's usage telemetry
    is off unless the user turned it on)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if uri.startswith("file:"):
        # MLflow 3 keeps folder stores in maintenance mode and refuses them unless asked: the user asked.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        import mlflow
    except ImportError as exc:
        raise MlflowError("MLflow is not installed: pip install 'edgeship[mlflow]'") from exc
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        for name in ("mlflow", "alembic"):  # schema migrations and progress chatter on every run
            logging.getLogger(name).setLevel(logging.WARNING)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow


@contextmanager
def _boundary(what: str) -> Iterator[None]:
    """MLflow, SQLAlchemy, HTTP and OS errors become one MlflowError naming what was being done."""
    try:
        yield
    except MlflowError:
        raise
    except Exception as exc:  # each backend has its own error types; map them once, here
        text = str(exc).strip()
        first = text.splitlines()[0][:400] if text else type(exc).__name__
        raise MlflowError(f"{what}: {first}") from exc


# ---------------------------------------------------------------- source models


@dataclass(frozen=True)
class Fetched:
    path: Path  # the model file (or SavedModel folder) to build
    name: str | None  # the registered model's name, when the URI names one
    origin: dict[str, Any] = field(default_factory=dict)  # for the summary and the signed provenance


def fetch_model(uri: str, tracking: str, dest: Path) -> Fetched:
    """Download the artifact at ``uri`` from the tracking store / registry at ``tracking`` into ``dest``."""
    m, r = _MODEL_URI.match(uri), _RUN_URI.match(uri)
    if not (m or r):
        raise MlflowError(f"{uri}: expected models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/PATH")
    mlflow = _mlflow(tracking_uri(tracking))
    origin: dict[str, Any] = {"uri": uri}
    exact = uri  # what is downloaded: an alias or "latest" is pinned to its version first
    with _boundary(f"{uri}: cannot resolve in MLflow at {_redact(tracking)}"):
        if m and (m["version"] or m["alias"]):
            mv = _model_version(mlflow.MlflowClient(), m["name"], m["version"], m["alias"])
            origin.update(registered_model=mv.name, model_version=str(mv.version), run_id=mv.run_id or "",
                          model_source=mv.source)
            exact = f"models:/{mv.name}/{mv.version}"
        elif r:
            origin["run_id"] = r["run"]
    dest.mkdir(parents=True, exist_ok=True)
    with _boundary(f"{uri}: download from MLflow at {_redact(tracking)} failed"):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=exact, dst_path=str(dest)))
    path = find_model(local, uri)
    origin["file"] = str(path.relative_to(local)) if path != local else path.name
    log.info("MLflow %s -> %s", uri, path)
    name = m["name"] if m and not m["name"].startswith("m-") else None  # m-…: an MLflow 3 logged-model id
    return Fetched(path, name, origin)


def _model_version(client: Any, name: str, version: str | None, alias: str | None) -> Any:
    if alias:
        return client.get_model_version_by_alias(name, alias)
    if version == "latest":
        found = client.search_model_versions(f"name = '{name}'")
        if not found:
            raise MlflowError(f"models:/{name}/latest: registered model {name!r} has no versions")
        return max(found, key=lambda v: int(v.version))
    return client.get_model_version(name, version)


def find_model(local: Path, uri: str) -> Path:
    """The model in a downloaded artifact: a model file itself, the data of an MLflow model folder's
    flavour (its ``MLmodel`` says where), or else the one model file / SavedModel folder inside."""
    if local.is_file():
        if local.suffix.lower() in MODEL_SUFFIXES:
            return local
        raise MlflowError(f"{uri}: {local.name} is not a model edgeship can build "
                          f"({', '.join(MODEL_SUFFIXES)} or a SavedModel folder)")
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        import yaml  # a dependency of MLflow

        try:
            flavors = (yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}).get("flavors") or {}
        except (yaml.YAMLError, UnicodeDecodeError, AttributeError) as exc:
            raise MlflowError(f"{uri}: MLmodel is not valid YAML ({exc})") from exc
        found = [f for f in FLAVORS if isinstance(flavors.get(f), dict) and flavors[f].get("data")]
        if not found:
            raise MlflowError(f"{uri}: an MLflow model with flavour(s) {', '.join(sorted(flavors)) or 'none'}; "
                              f"edgeship builds {', '.join(FLAVORS)} models")
        data = (local / str(flavors[found[0]]["data"])).resolve()
        if not data.is_relative_to(local.resolve()) or not data.exists():
            raise MlflowError(f"{uri}: MLmodel flavour {found[0]!r} names data {flavors[found[0]]['data']!r}, "
                              f"which is not inside the downloaded model")
        return find_model(data, uri) if data.is_file() else _one_model(data, uri)
    return _one_model(local, uri)


def _one_model(folder: Path, uri: str) -> Path:
    if (folder / "saved_model.pb").is_file():
        return folder
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES)
    found += sorted(p.parent for p in folder.rglob("saved_model.pb"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise MlflowError(f"{uri}: no model in the artifact (looked for {', '.join(MODEL_SUFFIXES)} files, "
                          f"a SavedModel folder or an MLmodel file)")
    names = ", ".join(str(p.relative_to(folder)) for p in found[:8])
    raise MlflowError(f"{uri}: {len(found)} models in the artifact ({names}); point at one, e.g. "
                      f"{uri.rstrip('/')}/{found[0].relative_to(folder)}")


def _redact(uri: str) -> str:
    """A tracking URI without credentials (http://user:secret@host -> http://***@host)."""
    return re.sub(r"//[^/@]+@", "//***@", uri)


# ---------------------------------------------------------------- build runs


class BuildLog:
    """One MLflow run per build. Opened before the build, so a wrong URI fails in seconds, not after it."""

    def __init__(self, uri: str, experiment: str):
        self.uri = tracking_uri(uri)
        self.mlflow = _mlflow(self.uri)
        self.start_ms = int(time.time() * 1000)
        with _boundary(f"MLflow at {_redact(uri)}: cannot open experiment {experiment!r}"):
            self.client = self.mlflow.MlflowClient()
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)

    def record(self, summary: dict[str, Any], profiles: list[dict[str, Any]], options: dict[str, Any],
               artifacts: dict[str, list[Path]], failed: str = "") -> str:
        """Log one finished (or failed) build; returns the run id. ``artifacts``: MLflow folder -> files."""
        from mlflow.entities import Metric, Param

        params, metrics, tags = build_params(summary, profiles, options), build_metrics(summary), build_tags(summary)
        now = int(time.time() * 1000)
        with _boundary(f"MLflow at {_redact(self.uri)}: logging the build failed (bundles and summary are "
                       f"written)"):
            run = self.client.create_run(self.experiment_id, start_time=self.start_ms,
                                         run_name=f"{summary['name']}-v{summary['version']}",
                                         tags={"mlflow.source.name": "edgeship build", **tags})
            rid = run.info.run_id
            plist = [Param(k, v) for k, v in params.items()]
            mlist = [Metric(k, v, now, 0) for k, v in metrics.items()]
            for i in range(0, max(len(plist), len(mlist)), 100):  # MLflow's per-call limits
                self.client.log_batch(rid, metrics=mlist[i:i + 100], params=plist[i:i + 100])
            for folder, files in artifacts.items():
                for f in files:
                    self.client.log_artifact(rid, str(f), folder)
            if failed:
                self.client.set_tag(rid, "edgeship.failed", failed[:5000])
            self.client.set_terminated(rid, "FAILED" if failed else "FINISHED")
        return rid


def _key(*parts: str) -> str:
    """An MLflow key: letters, digits, _ - . / and space."""
    return "/".join(re.sub(r"[^A-Za-z0-9_.\- ]", "_", p) for p in parts if p)


def _text(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def build_params(summary: dict[str, Any], profiles: list[dict[str, Any]], options: dict[str, Any]) -> dict[str, str]:
    prov = summary.get("provenance", {})
    src = prov.get("source", {})
    out = {"model": summary["name"], "version": str(summary["version"]),
           "source": src.get("origin", {}).get("uri") or src.get("file", ""), "source_kind": src.get("kind", ""),
           "source_sha256": src.get("sha256", "")}
    out.update({k: prov[k] for k in ("validation_sha256", "calibration_sha256", "training_sha256") if k in prov})
    out.update({_key("build", k): _text(v) for k, v in options.items() if v is not None})
    for p in profiles:
        out.update({_key(p["name"], k): _text(p[k]) for k in PROFILE_PARAMS if k in p})
        if len(p.get("runtimes", [])) > 1:  # several runtimes offered: say which, in order of preference
            out[_key(p["name"], "runtimes")] = _text(f"{r['name']} {r['version']}" for r in p["runtimes"])
    return {k: v[:6000] for k, v in out.items()}


def build_metrics(summary: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in summary["profiles"]:
        for v in p["variants"]:
            base = (p["profile"], v.get("runtime") or "", v["precision"])
            values = {"size_mb": v["size_bytes"] / 1e6, "passed": float(v["passed"]),
                      "chosen": float(v["chosen"]),
                      **{k: v["metrics"][k] for k in VARIANT_METRICS if k in v["metrics"]},
                      **{k: v["latency"][k] for k in LATENCY_METRICS if k in v["latency"]}}
            for k, x in values.items():
                if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
                    out[_key(*base, k)] = float(x)
    return out


def build_tags(summary: dict[str, Any]) -> dict[str, str]:
    tags = {"edgeship.model": summary["name"], "edgeship.version": str(summary["version"])}
    origin = summary.get("provenance", {}).get("source", {}).get("origin", {})
    tags.update({f"edgeship.source.{k}": str(v) for k, v in origin.items() if v})
    for p in summary["profiles"]:
        chosen = next((v for v in p["variants"] if v["chosen"]), None)
        tags[f"edgeship.chosen.{p['profile']}"] = (
            "/".join(x for x in (chosen.get("runtime"), chosen["precision"]) if x) if chosen else "none")
        if p.get("bundle_sha256"):
            tags[f"edgeship.bundle_sha256.{p['profile']}"] = p["bundle_sha256"]
    return tags
