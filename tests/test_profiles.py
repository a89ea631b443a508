"""Device profiles: the shipped ones are valid, bad ones are refused naming file and key."""

from __future__ import annotations

import pytest

from toolkit.errors import ProfileError
from toolkit.profiles import BUILTIN_DIR, find_profile, list_profiles, load_profile_file, search_dirs

SHIPPED = {"rpi4-arm64", "rpi5-arm64", "rpi3-armv7", "jetson-orin-nano", "coral-edgetpu", "x86_64-onnx"}


def test_shipped_profiles_load():
    profs = {p.name: p for p in list_profiles([BUILTIN_DIR])}
    assert SHIPPED <= set(profs)
    assert profs["rpi4-arm64"].runtime == "litert" and profs["rpi4-arm64"].cpu == "cortex-a72"
    assert profs["rpi3-armv7"].runtime == "tflite-runtime" and profs["rpi3-armv7"].numpy == "<2"
    assert profs["coral-edgetpu"].edgetpu and profs["coral-edgetpu"].int8_io == "uint8"
    assert profs["jetson-orin-nano"].format == "onnx" and profs["jetson-orin-nano"].precisions[0] == "fp16"
    assert profs["x86_64-onnx"].max_opset == 21
    rpi4 = profs["rpi4-arm64"]
    assert [(r.name, r.format) for r in rpi4.runtimes] == [("litert", "tflite"), ("onnxruntime", "onnx")]
    assert rpi4.runtimes[1].max_opset == 21 and rpi4.runtimes[1].threads == 4
    assert rpi4.only(rpi4.runtimes[1]).format == "onnx" and rpi4.only(rpi4.runtimes[1]).runtime == "onnxruntime"


BASE = """
name = "{name}"
[device]
arch = "{arch}"
[runtime]
name = "{runtime}"
version = "{version}"
threads = 2
{extra_runtime}
[precision]
accepted = {accepted}
[budgets]
model_mb = 10
ram_mb = 100
p95_latency_ms = 50
"""


def write(tmp_path, name="custom", arch="aarch64", runtime="litert", version="2.3.0",
          accepted='["int8"]', extra_runtime="", tail=""):
    p = tmp_path / f"{name}.toml"
    p.write_text(BASE.format(name=name, arch=arch, runtime=runtime, version=version, accepted=accepted,
                             extra_runtime=extra_runtime) + tail)
    return p


def test_user_profile_found_in_extra_dir(tmp_path):
    write(tmp_path, name="my-board")
    p = find_profile("my-board", search_dirs([tmp_path]))
    assert p.name == "my-board" and p.threads == 2 and p.objective == "latency"


@pytest.mark.parametrize("kw, match", [
    (dict(arch="armv7l", runtime="litert"), r"runtime.name: litert has no wheels for armv7l"),
    (dict(arch="armv7l", runtime="onnxruntime", extra_runtime="max_opset = 13"),
     r"onnxruntime has no wheels for armv7l"),
    (dict(runtime="tflite-runtime", version="2.16.1"), r"tflite-runtime 2.16.1 does not exist"),
    (dict(runtime="tflite-runtime", version="2.14.0", extra_runtime='numpy = ">=2"'),
     r"runtime.numpy: tflite-runtime 2.14.0 fails with NumPy 2"),
    (dict(runtime="onnxruntime", version="1.32.0"), r"runtime.max_opset: required"),
    (dict(accepted='["int4"]'), r"precision.accepted: \['int4'\] not valid for tflite"),
    (dict(accepted='[]'), r"precision.accepted: empty"),
    (dict(extra_runtime='delegate = "edgetpu"', accepted='["int8", "fp32"]'), r"Edge TPU runs only"),
    (dict(version="two"), r"runtime.version: 'two' is not a dotted version"),
    (dict(arch="sparc"), r"device.arch: 'sparc' is not one of"),
])
def test_impossible_profiles_refused(tmp_path, kw, match):
    p = write(tmp_path, **kw)
    with pytest.raises(ProfileError, match=match) as exc:
        load_profile_file(p)
    assert str(p) in str(exc.value)


def test_errors_name_file_and_key(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text('name = "broken"\n[device]\narch = "aarch64"\n')
    with pytest.raises(ProfileError, match=r"broken.toml: runtime.name: required key is missing"):
        load_profile_file(p)
    p.write_text("name = [unclosed")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile_file(p)
    p = write(tmp_path, name="wrongname")
    p.rename(tmp_path / "renamed.toml")
    with pytest.raises(ProfileError, match="must match the file name"):
        load_profile_file(tmp_path / "renamed.toml")
    p = write(tmp_path, tail="[accuracy]\nmax_drop_points = -1\n")
    with pytest.raises(ProfileError, match=r"accuracy.max_drop_points: must be > 0"):
        load_profile_file(p)
    p = write(tmp_path, extra_runtime="threads = 'four'")
    with pytest.raises(ProfileError):
        load_profile_file(p)


def test_unknown_profile_lists_known():
    with pytest.raises(ProfileError, match=r"unknown device profile 'nope'; known: .*rpi4-arm64"):
        find_profile("nope", search_dirs())


ALT = """
[[runtime.alternatives]]
name = "{name}"
version = "{version}"
{extra}
"""


def test_runtime_alternatives(tmp_path):
    """A device with several runtimes: each inherits threads and the accepted precisions it can run."""
    p = write(tmp_path, accepted='["int8", "int16x8", "fp32"]',
              extra_runtime=ALT.format(name="onnxruntime", version="1.32.0", extra="max_opset = 19"))
    prof = load_profile_file(p)
    lite, ort = prof.runtimes
    assert (lite.name, lite.precisions) == ("litert", ("int8", "int16x8", "fp32"))
    assert (ort.name, ort.precisions, ort.threads, ort.max_opset) == ("onnxruntime", ("int8", "fp32"), 2, 19)
    assert prof.summary()["runtimes"][1]["format"] == "onnx"
    p = write(tmp_path, extra_runtime=ALT.format(name="onnxruntime", version="1.32.0",
                                                 extra='max_opset = 17\nthreads = 1\naccepted = ["fp16"]'))
    ort = load_profile_file(p).runtimes[1]
    assert (ort.threads, ort.precisions) == (1, ("fp16",))


@pytest.mark.parametrize("kw, match", [
    (dict(arch="armv7l", runtime="tflite-runtime", version="2.14.0", extra_runtime='numpy = "<2"' + ALT.format(
        name="onnxruntime", version="1.32.0", extra="max_opset = 17")),
     r"runtime.alternatives\[0\].name: onnxruntime has no wheels for armv7l"),
    (dict(arch="armv7l", runtime="tflite-runtime", version="2.14.0", extra_runtime='numpy = "<2"' + ALT.format(
        name="litert", version="2.3.0", extra="")), r"runtime.alternatives\[0\].name: litert has no wheels for armv7l"),
    (dict(extra_runtime=ALT.format(name="onnxruntime", version="1.32.0", extra="")),
     r"runtime.alternatives\[0\].max_opset: required for onnxruntime"),
    (dict(extra_runtime=ALT.format(name="litert", version="2.3.0", extra="")),
     r"runtime.alternatives\[0\].name: litert is listed twice"),
    (dict(accepted='["int16x8"]', extra_runtime=ALT.format(name="onnxruntime", version="1.32.0", extra="max_opset = 17")),
     r"runtime.alternatives\[0\]: none of precision.accepted is valid for onnxruntime"),
    (dict(extra_runtime='alternatives = ["onnxruntime"]'), r"runtime.alternatives: expected a list of tables"),
])
def test_impossible_alternatives_refused(tmp_path, kw, match):
    p = write(tmp_path, **kw)
    with pytest.raises(ProfileError, match=match) as exc:
        load_profile_file(p)
    assert str(p) in str(exc.value)
