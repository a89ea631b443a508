"""Concurrency: a pool of interpreters per model, and hot swap with zero failed requests proven over HTTP
with concurrent keep-alive clients while installs and a rollback run."""

from __future__ import annotations

import http.client
import json
import threading

import numpy as np

from agent.serve.http import make_server, serve_in_thread
from agent.serve.service import Agent
from test_install import rebundle

X = np.random.default_rng(3).random((1, 8, 8, 1), np.float32)


def test_pool_lends_each_interpreter_to_one_caller(fleet_bundles, keyring, tmp_path):
    agent = Agent(tmp_path / "state", keyring, "aarch64", interpreters=2)
    agent.start()
    assert agent.install(fleet_bundles["v1"]).ok
    pool = agent.current.runner.pool
    assert pool.instances == 1  # an idle agent holds one interpreter
    got = threading.Event()

    def third() -> None:
        with pool.lease():
            got.set()

    with pool.lease() as a, pool.lease() as b:
        assert a is not b and pool.instances == 2
        waiter = threading.Thread(target=third)
        waiter.start()
        assert not got.wait(0.2)  # both lent: a third caller waits for one (a bounded negative check)
    waiter.join(10)
    assert got.is_set() and pool.instances == 2


def test_hot_swap_over_http_has_zero_failed_requests(fleet_bundles, signing_key, keyring, tmp_path):
    v3 = rebundle(fleet_bundles["v1"], tmp_path / "v3.bundle", signing_key, version=3)
    agent = Agent(tmp_path / "state", keyring, "aarch64", interpreters=2)
    agent.start()
    assert agent.install(fleet_bundles["v1"]).ok
    server = make_server(agent, "127.0.0.1", 0)
    serve_in_thread(server)
    port = server.server_address[1]
    body = json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8, 1], "datatype": "FP32",
                                   "data": X.ravel().tolist()}]})
    stop = threading.Event()
    seen: list[list] = [[] for _ in range(4)]

    def client(k: int) -> None:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while not stop.is_set() and len(seen[k]) < 20000:
            c.request("POST", "/v2/models/digits/infer", body=body)
            r = c.getresponse()
            data = r.read()
            seen[k].append((r.status, json.loads(data).get("model_version") if r.status == 200 else data))
        c.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        marks = []
        for step in (lambda: agent.install(fleet_bundles["v2"]), lambda: agent.install(v3), agent.rollback):
            before = [len(s) for s in seen]
            res = step()
            assert res.ok if hasattr(res, "ok") else res
            marks.append([len(s) - b for s, b in zip(seen, before)])
        after = [len(s) for s in seen]
        while any(len(s) < a + 2 for s, a in zip(seen, after)) and all(t.is_alive() for t in threads):
            stop.wait(0.01)  # poll until every client got answers from the rolled-back model
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        server.shutdown()
        server.server_close()
    answers = [a for s in seen for a in s]
    failed = [a for a in answers if a[0] != 200]
    assert not failed, failed[:3]
    assert {v for _, v in answers} == {"1", "2", "3"}
    assert all(s[-1] == (200, "2") for s in seen)  # after the rollback, v2 answers
    assert all(sum(m) > 0 for m in marks[:2]), marks  # requests were in flight during each install (a rollback
    # only switches slots: it can end between two answers)
