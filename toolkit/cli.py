"""`edgeship` - the host CLI. Heavy libraries load inside commands, so `--help` stays instant.

Errors from toolkit and agent are turned into one clean message here (exit 1; usage errors exit 2).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from agent.errors import AgentError
from toolkit.cli_fleet import emit_json as _emit
from toolkit.cli_fleet import register
from toolkit.cli_capture import register as register_capture
from toolkit.cli_security import register as register_security
from toolkit.errors import ToolkitError
from toolkit.settings import Settings


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ToolkitError, AgentError) as exc:
            err = click.ClickException(str(exc))
            err.exit_code = getattr(exc, "exit_code", 1)
            raise err from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", envvar="EDGESHIP_HOME", type=click.Path(file_okay=False), show_default="~/.edgeship",
              help="State folder: keys, registry, fleet database [env EDGESHIP_HOME].")
@click.option("--profiles-dir", multiple=True, type=click.Path(file_okay=False),
              help="Extra folder of device profile .toml files (repeatable).")
@click.option("-v", "--verbose", is_flag=True, help="Log debug details to stderr.")
@click.version_option(package_name="edgeship")
@click.pass_context
def cli(ctx: click.Context, home: str | None, profiles_dir: tuple[str, ...], verbose: bool) -> None:
    """edgeship: optimize, validate, sign and ship models to device fleets."""
    ctx.obj = Settings.resolve(home, profiles_dir)
    if not verbose and not os.environ.get("EDGESHIP_DEBUG"):
        from toolkit.tfenv import native_stderr_to

        ctx.with_resource(native_stderr_to(ctx.obj.home / "native.log"))  # no TF/absl lines in our output
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def _dirs(s: Settings) -> list[Path]:
    from toolkit.profiles import search_dirs

    return search_dirs(list(s.profiles_dirs))


class _Progress:
    """One updating status line on a terminal, plain timestamped lines otherwise."""

    def __init__(self, quiet: bool = False):
        self.start, self.quiet, self.tty = time.monotonic(), quiet, sys.stderr.isatty()

    def __call__(self, msg: str) -> None:
        if self.quiet:
            return
        line = f"[{time.monotonic() - self.start:6.1f}s] {msg}"
        if self.tty:
            click.echo(f"\r\x1b[2K{line}", nl=False, err=True)
        else:
            click.echo(line, err=True)

    def done(self) -> None:
        if self.tty and not self.quiet:
            click.echo("", err=True)


# ---------------------------------------------------------------- build
class _ModelSource(click.ParamType):
    """A model file or folder that exists, or an MLflow models:/ or runs:/ URI (kept as a string)."""

    name = "model"

    def convert(self, value: Any, param: Any, ctx: Any) -> Path | str:
        from toolkit.mlflow_link import is_mlflow_uri

        if isinstance(value, str) and is_mlflow_uri(value):
            return value
        return click.Path(exists=True, path_type=Path).convert(value, param, ctx)


@cli.command()
@click.argument("model", type=_ModelSource())
@click.option("-p", "--profile", "profiles", multiple=True, required=True,
              help="Device profile name or .toml path (repeatable).")
@click.option("--validation", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help=".npz with one array per model input (or x) and optional labels y.")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              show_default="the validation data", help=".npz of representative inputs for int8 calibration.")
@click.option("--train", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=".npz with inputs and labels y, for --prune / --qat fine-tuning.")
@click.option("--name", show_default="MODEL's file stem; for models:/NAME/… the registered name", help="Model name in the bundle and registry.")
@click.option("--version", "version", type=int, show_default="registry latest + 1", help="Bundle version.")
@click.option("--meta", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON with labels, preprocessing, postprocessing and state metadata.")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("dist"),
              show_default=True, help="Output folder for bundles, summary and report.")
@click.option("--key", type=click.Path(dir_okay=False, path_type=Path), show_default="HOME/keys/signing.pem",
              help="Ed25519 signing key (HOME's key is created on first use).")
@click.option("--prune", type=float, help="Magnitude-prune to this sparsity before converting (needs --train).")
@click.option("--qat", is_flag=True, help="Add a quantization-aware-trained int8 variant (needs --train).")
@click.option("--epochs", type=int, default=2, show_default=True, help="Fine-tuning epochs.")
@click.option("--no-selective", is_flag=True, help="Do not try to repair a failing int8 model.")
@click.option("--keep-variants", is_flag=True, help="Keep every variant file in OUT/variants-NAME/.")
@click.option("--variant", help="Pin the bundled variant (e.g. int8, or onnxruntime/int8 on a profile with "
              "several runtimes) instead of choosing by objective.")
@click.option("--unsafe-deserialization", is_flag=True,
              help="Allow Keras Lambda layers: loading runs Python code stored in the model file. Only for "
              "files you trust.")
@click.option("--min-reference-accuracy", type=click.FloatRange(0, 1), show_default="chance, 1/classes",
              help="With labels: fail the gate when the fp32 reference accuracy is below this.")
@click.option("--state", "state_pairs", multiple=True, metavar="IN=OUT",
              show_default="--meta's \"state\", else found by name, e.g. state=stateN",
              help="A streaming model's state: input IN takes the value output OUT returns (repeatable); the "
              "agent keeps it per sequence.")
@click.option("--no-state", is_flag=True, help="Declare no streaming state (clients send every input).")
@click.option("--quick", is_flag=True, help="Short latency runs (smoke tests): numbers are rough, so the latency "
              "budget is reported but not enforced.")
@click.option("--json", "as_json", is_flag=True, help="Print the build summary as JSON on stdout.")
@click.option("--mlflow", "mlflow_uri", metavar="URI",
              help="Log the build as a run in this MLflow tracking store (sqlite:///mlflow.db, a folder, "
              "http://…); models:/ and runs:/ sources are looked up there too [else $MLFLOW_TRACKING_URI].")
@click.option("--mlflow-experiment", default="edgeship", show_default=True, help="MLflow experiment name.")
@click.pass_obj
def build(s: Settings, model: Path | str, profiles: tuple[str, ...], validation: Path, calibration: Path | None,
          train: Path | None, name: str | None, version: int | None, meta: Path | None, out: Path,
          key: Path | None, prune: float | None, qat: bool, epochs: int, no_selective: bool,
          keep_variants: bool, variant: str | None, unsafe_deserialization: bool,
          min_reference_accuracy: float | None, state_pairs: tuple[str, ...], no_state: bool, quick: bool,
          as_json: bool, mlflow_uri: str | None,
          mlflow_experiment: str) -> None:
    """Convert MODEL for each device profile, validate every variant and write signed bundles.

    MODEL is a Keras (.keras/.h5), SavedModel folder, ONNX or TFLite file, or an MLflow
    models:/NAME/VERSION (models:/NAME@ALIAS) or runs:/RUN_ID/PATH URI (needs edgeship[mlflow])."""
    from toolkit.build.pipeline import BuildOptions, build as run_build, write_summary
    from toolkit.build.state import parse as parse_state
    from toolkit.errors import BuildFailed
    from toolkit.errors import InputError
    from toolkit.build.measure import LatencyConfig
    from toolkit.profiles import find_profile
    from toolkit.registry import Registry
    from toolkit.build.report import write_report
    from toolkit.signing import load_key, load_or_create

    profs = [find_profile(p, _dirs(s)) for p in profiles]
    mlog = None
    if mlflow_uri:
        from toolkit.mlflow_link import BuildLog

        mlog = BuildLog(mlflow_uri, mlflow_experiment)  # a wrong URI fails now, not after the build
    fetched, origin = None, {}
    if isinstance(model, str):
        fetched, model, fetched_name, origin = _fetch(model, mlflow_uri)
        name = name or fetched_name
    meta_doc: dict[str, Any] = {}
    if meta:
        try:
            meta_doc = json.loads(meta.read_text())
            assert isinstance(meta_doc, dict)
        except (ValueError, AssertionError) as exc:
            raise InputError(f"{meta}: expected a JSON object with labels/preprocessing/postprocessing") from exc
    signing = load_key(key) if key else load_or_create(s.key_path)
    registry = Registry(s.registry_path)
    # --quick: short timing runs give rough numbers, so the latency budget is reported, not enforced
    latency = LatencyConfig(runs=10, seconds=0.1, warmup_seconds=0.05, gate=False) if quick else LatencyConfig()
    progress = _Progress(quiet=as_json and not sys.stderr.isatty())
    opts = BuildOptions(model=model, profiles=profs, validation=validation, calibration=calibration,
                        train=train, name=name, version=version, meta=meta_doc, out_dir=out,
                        key=signing, registry=registry, prune=prune, qat=qat, epochs=epochs,
                        latency=latency, runtime_pythons=s.runtime_pythons(), selective=not no_selective,
                        variant=variant, min_reference_accuracy=min_reference_accuracy,
                        keep_variants=out / f"variants-{name or model.stem}" if keep_variants else None,
                        unsafe_deserialization=unsafe_deserialization, source_origin=origin,
                        state=parse_state(state_pairs) if state_pairs else ([] if no_state else None),
                        detect_state=not no_state)
    failed: BuildFailed | None = None
    try:
        result = run_build(opts, progress)
    except BuildFailed as exc:
        failed, result = exc, exc.result
    finally:
        progress.done()
        registry.close()
        if fetched is not None:
            fetched.cleanup()
    out.mkdir(parents=True, exist_ok=True)
    summary = out / f"{result.file_stem()}.json"
    report = out / f"{result.file_stem()}.html"
    write_summary(result, summary)
    write_report(result, report)
    run_id = None
    if mlog is not None:
        run_id = mlog.record(result.to_dict(), [p.profile.summary() for p in result.profiles],
                             {"prune": prune, "qat": qat, "epochs": epochs if (prune or qat) else None,
                              "variant": variant, "selective": not no_selective,
                              "latency": "quick" if quick else "full", "validation": validation.name,
                              "calibration": calibration.name if calibration else None,
                              "train": train.name if train else None},
                             {"build": [summary, report], "bundles": [p.bundle for p in result.profiles if p.bundle]},
                             failed=str(failed) if failed else "")
    if as_json:
        _emit({**result.to_dict(), **({"mlflow_run_id": run_id} if run_id else {})})
    else:
        click.echo(result.table())
        for n in result.notes:
            click.echo(f"note: {n}")
        for p in result.profiles:
            for n in p.notes + [f"{v.precision}: {x}" for v in p.variants for x in v.notes]:
                click.echo(f"note [{p.profile.name}]: {n}")
            if p.bundle and p.chosen:
                click.echo(f"bundle [{p.profile.name}]: {p.bundle} ({p.chosen.runtime} {p.chosen.precision})")
            else:
                click.echo(f"no bundle [{p.profile.name}]: {p.verdict}")
        click.echo(f"summary: {summary}\nreport:  {report}")
        if run_id:
            click.echo(f"mlflow:  run {run_id} in experiment {mlflow_experiment!r}")
    if failed:  # the table and one line per profile said why: the error only sums up
        missing = [p.profile.name for p in result.profiles if p.bundle is None]
        err = ToolkitError(f"no bundle for {len(missing)} of {len(result.profiles)} profile(s): "
                           f"{', '.join(missing)} (see {'the summary' if as_json else 'above'})")
        err.exit_code = failed.exit_code
        raise err from failed


def _fetch(uri: str, mlflow_uri: str | None) -> tuple[Any, Path, str | None, dict[str, Any]]:
    """Download an MLflow source model to a temporary folder (the caller cleans it up)."""
    import os
    import tempfile

    from toolkit.mlflow_link import fetch_model

    tracking = mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking:
        raise click.UsageError(f"{uri}: say which MLflow tracking store holds it: --mlflow URI or "
                               f"MLFLOW_TRACKING_URI")
    tmp = tempfile.TemporaryDirectory(prefix="edgeship-mlflow-")
    try:
        got = fetch_model(uri, tracking, Path(tmp.name))
    except BaseException:
        tmp.cleanup()
        raise
    return tmp, got.path, got.name, got.origin


# ---------------------------------------------------------------- profiles
@cli.group()
def profiles() -> None:
    """Device profiles."""


@profiles.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def profiles_list(s: Settings, as_json: bool) -> None:
    """List known device profiles."""
    from toolkit.profiles import list_profiles

    profs = list_profiles(_dirs(s))
    if as_json:
        return _emit([p.summary() for p in profs])
    for p in profs:
        runtimes = " + ".join(f"{r.name} {r.version}" for r in p.runtimes)
        click.echo(f"{p.name:<18} {p.arch:<8} {runtimes:<36} {','.join(p.precisions):<28} {p.description}")


@profiles.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the TOML keys as nested JSON.")
@click.pass_obj
def profiles_show(s: Settings, name: str, as_json: bool) -> None:
    """Show one profile, validated, under its TOML keys with defaults filled in."""
    from toolkit.profiles import find_profile

    p = find_profile(name, _dirs(s))
    _emit(p.toml_doc()) if as_json else click.echo(p.to_toml(), nl=False)


# ---------------------------------------------------------------- keys
@cli.group()
def keys() -> None:
    """Signing keys."""


@keys.command("generate")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), show_default="HOME/keys/signing.pem",
              help="Private key path; the .pub goes beside it.")
@click.option("--force", is_flag=True, help="Replace an existing key.")
@click.pass_obj
def keys_generate(s: Settings, out: Path | None, force: bool) -> None:
    """Create an Ed25519 signing key pair. Copy the .pub to devices' keyrings."""
    from toolkit.signing import generate_key

    k = generate_key(out or s.key_path, force=force)
    click.echo(f"key id {k.key_id}\nprivate {k.path} (keep secret)\npublic  {k.path.with_suffix('.pub')}")


# ---------------------------------------------------------------- bundle
@cli.group()
def bundle() -> None:
    """Inspect and verify bundles."""


@bundle.command("inspect")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def bundle_inspect(path: Path, as_json: bool) -> None:
    """Show a bundle's manifest (NOT verified: use `bundle verify`)."""
    from agent.bundle import inspect_bundle

    doc, kid = inspect_bundle(path)
    if as_json:
        return _emit(doc)
    click.echo(f"{doc.get('name')} v{doc.get('version')}  profile {doc.get('profile')}  "
               f"{doc.get('format')}/{doc.get('precision')}  signed by {kid} (unverified)")
    rt = doc.get("runtime", {})
    click.echo(f"runtime {rt.get('name')} >= {rt.get('min_version')}, {rt.get('threads')} threads, "
               f"arch {doc.get('arch')}")
    for kind in ("inputs", "outputs"):
        for t in doc.get(kind, []):
            q = t.get("quantization")
            click.echo(f"  {kind[:-1]:<6} {t['name']:<20} {t['dtype']:<8} {t['shape']}"
                       + (f"  scale={q['scale']:.6g} zp={q['zero_point']}" if q else ""))
    for f in doc.get("files", []):
        click.echo(f"  file   {f['path']:<20} {f['size']:>10} B  sha256 {f['sha256'][:16]}…")
    if enc := doc.get("encryption"):
        click.echo(f"encrypted ({enc.get('aead')}) for {len(enc.get('recipients', []))} device(s): the files above "
                   f"are ciphertext")
    click.echo(f"metrics {json.dumps(doc.get('metrics', {}), sort_keys=True)}")


@bundle.command("verify")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--keyring", type=click.Path(exists=True, path_type=Path),
              show_default="HOME's keyring (keys/keyring.json, else keys/*.pub)",
              help="Trusted .pub file or folder of them.")
@click.pass_obj
def bundle_verify(s: Settings, path: Path, keyring: Path | None) -> None:
    """Verify signature, structure and every file hash; load the model and replay the golden set (an encrypted
    bundle: signature and ciphertext hashes only)."""
    import tempfile

    from agent.bundle import extract_bundle, inspect_bundle, verify_bundle
    from agent.golden import replay
    from agent.keys import Keyring
    from agent.runtime import load_model
    from toolkit.key_rotation import trusted

    ring = Keyring.load(keyring) if keyring else trusted(s)
    if "encryption" in inspect_bundle(path)[0]:
        m = verify_bundle(path, ring)
        return click.echo(f"signature OK: {m.id} ({m.profile}) signed by {m.key_id}; {len(m.files)} ciphertext "
                          f"hashes OK; encrypted for {len(m.data['encryption']['recipients'])} device(s): "
                          f"not loaded here")
    with tempfile.TemporaryDirectory(prefix="edgeship-verify-") as tmp:
        folder = Path(tmp) / "bundle"
        m = extract_bundle(path, ring, folder)
        click.echo(f"signature OK: {m.id} ({m.profile}, {m.format}/{m.precision}) signed by {m.key_id}; "
                   f"{len(m.files)} file hashes OK")
        model = load_model(folder / m.model_file, threads=1)
        worst = replay(model, m, folder)
        click.echo(f"golden set OK: {m.golden['count']} samples in {model.runtime}, "
                   f"max |error| {worst:.3g} <= atol {m.golden['atol']:g}")


# ---------------------------------------------------------------- models
@cli.group()
def models() -> None:
    """The build registry."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def models_list(s: Settings, as_json: bool) -> None:
    """Models in the registry with their latest version."""
    from toolkit.registry import Registry

    reg = Registry(s.registry_path)
    rows = reg.models()
    reg.close()
    if as_json:
        return _emit(rows)
    click.echo(f"{'model':<20} {'latest':>6} {'builds':>6}  profiles")
    for r in rows:
        click.echo(f"{r['model']:<20} {r['latest']:>6} {r['builds']:>6}  {r['profiles']}")


@models.command("history")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def models_history(s: Settings, name: str, as_json: bool) -> None:
    """Every build of NAME: version, profile, variant, size, bundle."""
    from toolkit.registry import Registry

    reg = Registry(s.registry_path)
    rows = reg.history(name)
    reg.close()
    if not rows:
        raise ToolkitError(f"no builds of model {name!r} in {s.registry_path}")
    if as_json:
        return _emit(rows)
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"]))
        click.echo(f"v{r['version']:<4} {r['profile']:<18} {r['variant']:<15} {r['size_bytes']:>9} B  "
                   f"{when}  {r['bundle_path']}")


# ---------------------------------------------------------------- runtimes
@cli.group()
def runtimes() -> None:
    """Device runtimes installed on this host for exact load checks."""


@runtimes.command("install")
@click.argument("profile")
@click.pass_obj
def runtimes_install(s: Settings, profile: str) -> None:
    """Install PROFILE's runtime (e.g. tflite-runtime 2.14 + numpy<2) into a venv in the runtimes cache
    (~/.cache/edgeship/runtimes, or $EDGESHIP_RUNTIMES)."""
    from toolkit.profiles import find_profile
    from toolkit.runtimes import install

    p = find_profile(profile, _dirs(s))
    py = install(p, s.runtime_env(p.runtime, p.runtime_version))
    click.echo(f"{p.runtime} {p.runtime_version} ready: {py}")


@runtimes.command("list")
@click.pass_obj
def runtimes_list(s: Settings) -> None:
    """Installed runtime environments (in ~/.cache/edgeship/runtimes, or $EDGESHIP_RUNTIMES)."""
    found = s.runtime_pythons()
    for name, py in found.items():
        click.echo(f"{name:<28} {py}")
    if not found:
        click.echo(f"no runtime environments in {s.runtimes} (`edgeship runtimes install PROFILE`)")


# ---------------------------------------------------------------- demo
@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), show_default="HOME/demo",
              help="Where to put the example model, bundles and fleet.")
@click.option("--quick", is_flag=True, help="Short latency runs.")
@click.pass_obj
def demo(s: Settings, workdir: Path | None, quick: bool) -> None:
    """The whole story on the built-in example: train, build for three profiles, verify a bundle, then a
    local fleet (broker + 4 agents): canary rollout, a delta v2, captured data that calibrates v3."""
    from toolkit.demo.story import run_demo

    run_demo(s, workdir or s.home / "demo", quick=quick, echo=click.echo)


register(cli)  # publish, broker, rollout, fleet
register_capture(cli)  # capture
register_security(cli)  # device, ca, keys root-init/sign-keyring/publish-keyring/rotate/revoke/list


def main() -> None:
    cli(prog_name="edgeship")


if __name__ == "__main__":
    main()
