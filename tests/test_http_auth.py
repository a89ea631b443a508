"""The local HTTP API beyond 127.0.0.1: a bearer token ([http] token_file) and HTTPS ([http] tls_cert/tls_key),
with real clients — http.client over TLS checking the certificate, and the published tritonclient."""

from __future__ import annotations

import http.client
import json
import logging
import ssl

import numpy as np
import pytest

from agent.config import load_config
from agent.serve.http import make_server, serve_in_thread
from agent.serve.service import Agent
from conftest import DEVICE_ARCH, device_bundle
from mosquitto import make_ca_and_server_cert

TOKEN = "t0ken-" + "x" * 32


@pytest.fixture(scope="module")
def tls_served(digits_build, keyring, tmp_path_factory):
    folder = tmp_path_factory.mktemp("https")
    ca, cert, key = make_ca_and_server_cert(folder)
    agent = Agent(folder / "state", keyring, DEVICE_ARCH)
    agent.start()
    assert agent.install(device_bundle(digits_build)).ok
    server = make_server(agent, "127.0.0.1", 0, token=TOKEN, tls=(str(cert), str(key)))
    serve_in_thread(server)
    yield server.server_address[1], ca
    server.shutdown()
    server.server_close()


def _get(port, ca, path, headers=None):
    ctx = ssl.create_default_context(cafile=str(ca))
    c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"null"), dict(r.getheaders())
    finally:
        c.close()


def test_bearer_token_over_https(tls_served):
    port, ca = tls_served
    status, body, headers = _get(port, ca, "/v2/models/digits")
    assert status == 401 and "bearer token" in body["error"] and headers["www-authenticate"].startswith("Bearer")
    assert _get(port, ca, "/metrics", {"Authorization": "Bearer wrong"})[0] == 401
    assert _get(port, ca, "/v2/health/live", {"Authorization": f"Basic {TOKEN}"})[0] == 401
    assert _get(port, ca, "/v2/health/live", {"Authorization": f"Bearer {TOKEN}x"})[0] == 401
    assert _get(port, ca, "/v2/health/live", {"Authorization": f"bearer {TOKEN}"})[0] == 200  # RFC 7235: any case
    status, body, _ = _get(port, ca, "/v2/models/digits", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and body["versions"] == ["1"]
    plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # plain HTTP to the HTTPS port
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        plain.request("GET", "/v2")
        plain.getresponse().read()
    plain.close()
    other = ca.parent / "other-ca"
    other.mkdir(exist_ok=True)
    with pytest.raises(ssl.SSLCertVerificationError):  # not the certificate a client trusting another CA expects
        _get(port, make_ca_and_server_cert(other)[0], "/v2")


def test_published_v2_client_with_token_and_tls(tls_served):
    httpclient = pytest.importorskip("tritonclient.http")
    port, ca = tls_served
    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", ssl=True,
                                              ssl_context_factory=lambda: ssl.create_default_context(cafile=str(ca)))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.is_server_live(headers=auth)
    x = np.random.default_rng(0).random((2, 8, 8, 1)).astype(np.float32)
    inp = httpclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    out = client.infer("digits", [inp], headers=auth).as_numpy("probs")
    assert out.shape == (2, 10) and np.allclose(out.sum(1), 1, atol=1e-3)
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="bearer token"):
        client.infer("digits", [inp])
    client.close()


def test_token_and_tls_settings(tmp_path, caplog, digits_build, keyring):
    (tmp_path / "http.token").write_text(f"{TOKEN}\n")
    (tmp_path / "agent.toml").write_text('[http]\nhost = "0.0.0.0"\ntoken_file = "http.token"\n'
                                         'tls_cert = "tls/server.pem"\ntls_key = "tls/server.key"\n')
    cfg = load_config(tmp_path / "agent.toml", env={})
    assert cfg.http_token == TOKEN and TOKEN not in repr(cfg)  # relative paths: next to agent.toml
    assert cfg.http_tls_cert == str(tmp_path / "tls" / "server.pem")
    (tmp_path / "only.toml").write_text('[http]\ntls_cert = "a.pem"\n')
    with pytest.raises(Exception, match="go together"):
        load_config(tmp_path / "only.toml", env={})
    agent = Agent(tmp_path / "st", keyring, DEVICE_ARCH)
    with caplog.at_level(logging.WARNING, logger="agent.serve.http"):
        make_server(agent, "127.0.0.2", 0).server_close()  # beyond loopback, no token: said loudly
    assert "open to anyone" in caplog.text
