"""Stateful and streaming models: each sequence starts fresh, no request sees the golden replay's state
or another sequence's, a bounded number of live sequences, idle expiry. Through the real tritonclient
(Triton's sequence parameters) for a TFLite model with resource variables and an ONNX model whose
state the manifest declares."""

from __future__ import annotations

import numpy as np
import pytest

from agent.errors import CapacityError, SequenceError
from agent.serve.sequences import Sequence, Sequences, StatePlan
from agent.serve.service import Agent
from modelkit import counter_tflite, make_bundle, serving_client, state_io_model

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

ONES = np.ones((1, 4), np.float32)


@pytest.fixture(scope="module")
def stateful_bundles(signing_key, tmp_path_factory):
    d = tmp_path_factory.mktemp("seq")
    counter, cx = counter_tflite()
    io, ix = state_io_model()
    return {"tflite-variables": make_bundle(d / "counter.bundle", signing_key, counter, cx, fmt="tflite",
                                            name="counter"),
            "onnx-declared-state": make_bundle(d / "stream.bundle", signing_key, io, ix, name="counter",
                                               state=[{"input": "h_in", "output": "h_out"}])}


@pytest.fixture(scope="module", params=["tflite-variables", "onnx-declared-state"])
def served(request, stateful_bundles, keyring, tmp_path_factory):
    yield from serving_client(tmp_path_factory.mktemp("seqa") / "state", keyring, "x86_64",
                              stateful_bundles[request.param], max_sequences=3)


def total(client, seq=0, start=False, end=False) -> float:
    x = httpclient.InferInput("x", [1, 4], "FP32").set_data_from_numpy(ONES)
    res = client.infer("counter", [x], sequence_id=seq, sequence_start=start, sequence_end=end)
    name = "total" if res.as_numpy("total") is not None else "y"
    return float(res.as_numpy(name)[0, 0])


def test_requests_without_a_sequence_start_fresh(served):
    """Never the state the golden-set replay left (it ran x=1 once), never another request's."""
    _, client = served
    assert [total(client) for _ in range(3)] == [1.0, 1.0, 1.0]


def test_each_sequence_has_its_own_state(served):
    _, client = served
    assert total(client, 11, start=True) == 1.0
    assert total(client, 11) == 2.0
    assert total(client, "stream-b", start=True) == 1.0  # string ids, as Triton allows
    assert total(client, 11) == 3.0
    assert total(client, "stream-b", end=True) == 2.0
    assert total(client) == 1.0
    assert total(client, 11, start=True) == 1.0  # a new start begins again
    with pytest.raises(InferenceServerException, match="sequence 'stream-b' is not live"):
        total(client, "stream-b")  # ended
    total(client, 11, end=True)


def test_live_sequences_are_bounded(served):
    agent, client = served
    for sid in (1, 2, 3):
        total(client, sid, start=True)
    with pytest.raises(InferenceServerException, match=r"too many live sequences \(3"):
        total(client, 4, start=True)
    total(client, 2, end=True)
    assert total(client, 4, start=True, end=True) == 1.0
    for sid in (1, 3):
        total(client, sid, end=True)
    assert len(agent.current.runner.sequences) == 0


def test_metadata_hides_declared_state_and_config_describes_it(served):
    agent, client = served
    meta = client.get_model_metadata("counter")
    assert [t["name"] for t in meta["inputs"]] == ["x"]
    cfg = client.get_model_config("counter")
    assert cfg["sequence_batching"]["max_live_sequences"] == 3
    if agent.current.runner.plan.kind == "io":
        assert cfg["sequence_batching"]["state"][0]["input_name"] == "h_in"
        assert [t["name"] for t in meta["outputs"]] == ["y"]


def test_idle_sequences_expire_and_ids_are_checked():
    now = [0.0]
    seqs = Sequences(StatePlan("io"), lambda: None, max_live=1, idle_timeout=10, clock=lambda: now[0])
    seqs.session(Sequence(5, start=True))
    with pytest.raises(CapacityError):
        seqs.session(Sequence(6, start=True))
    now[0] = 10.5
    with pytest.raises(SequenceError, match="idle for more than 10 s"):
        seqs.session(Sequence(5))
    seqs.session(Sequence(6, start=True))
    assert Sequence.parse({}) is None
    for bad, match in [({"sequence_id": -1}, "unsigned 64-bit"), ({"sequence_id": 1.5}, "integer or a string"),
                       ({"sequence_id": 1, "sequence_end": "yes"}, "true or false"),
                       ({"sequence_start": True}, "non-zero sequence_id")]:
        with pytest.raises(SequenceError, match=match):
            Sequence.parse(bad)


def test_declared_state_must_name_model_tensors(signing_key, keyring, tmp_path):
    io, ix = state_io_model()
    bundle = make_bundle(tmp_path / "b.bundle", signing_key, io, ix, state=[{"input": "h_in", "output": "nope"}])
    agent = Agent(tmp_path / "state", keyring, "x86_64")
    agent.start()
    res = agent.install(bundle)
    assert res.status == "rolled-back" and "manifest.json.state[0]" in res.reason
    assert agent.current is None
