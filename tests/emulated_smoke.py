"""Agent smoke run inside an emulated Raspberry Pi userland (aarch64 or armv7l, under qemu-user).

Runs in-process (no subprocess: without binfmt_misc an emulated exec of sys.executable fails):
install v1 (signature, hashes, LiteRT load, golden set), serve HTTP, infer over v2, rebuild v2 from a
zstd delta patch against the installed v1 and install it with hot swap, refuse a tampered bundle, roll
back; install an encrypted v3 sealed for this device's model key (X25519, AES-GCM on this CPU); telemetry
window on the way. Prints one JSON line with what it saw.
usage: python emulated_smoke.py STATE_DIR KEYRING V1 V2_PATCH TAMPERED INPUT_NPY SEALED_V3 MODEL_KEY
(V2_PATCH.json: its meta)
"""

import http.client
import json
import platform
import sys
from pathlib import Path

import numpy as np

from agent.fleet import delta
from agent.serve.http import make_server, serve_in_thread
from agent.keys import Keyring
from agent.seal import Opener
from agent.serve.service import Agent


def post(port, path, body):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    return r.status, json.loads(r.read())


def main():
    state, keyring, v1, v2_patch, tampered, xpath, sealed, model_key = sys.argv[1:9]
    agent = Agent(Path(state), Keyring.load(keyring), platform.machine(), opener=Opener.load(Path(model_key)))
    agent.start()
    out = {"machine": platform.machine(), "numpy": np.__version__}
    out["install_v1"] = agent.install(Path(v1)).chain
    out["runtime"] = agent.current.model.runtime
    server = make_server(agent, "127.0.0.1", 0)
    serve_in_thread(server)
    port = server.server_address[1]
    x = np.load(xpath)
    status, res = post(port, "/v2/models/digits/infer", {"inputs": [
        {"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})
    out["infer_status"] = status
    out["infer_top1"] = np.array(res["outputs"][0]["data"]).reshape(x.shape[0], -1).argmax(1).tolist()
    meta = json.loads(Path(v2_patch + ".json").read_text())
    cur = agent.current
    slot = agent.store.slot(cur.slot)
    base = delta.base_content(lambda p: (slot / p).read_bytes(), [f.path for f in cur.manifest.files])
    v2 = Path(state) / "v2-from-delta.bundle"
    v2.write_bytes(delta.apply_patch(base, Path(v2_patch).read_bytes(), meta["target_sha256"], meta["target_size"],
                                     meta["window_log"]))
    out["delta_applied"] = delta.available()
    for _ in range(3):
        agent.predict(x)
    out["telemetry"] = agent.current.window.snapshot()  # the HTTP request + these 3
    out["install_v2"] = agent.install(v2).status
    out["serving_after_v2"] = agent.current.manifest.version
    bad = agent.install(Path(tampered))
    out["tampered"] = [bad.status, bad.reason[:80]]
    out["rollback_to"] = agent.rollback()
    out["serving_after_rollback"] = agent.current.manifest.version
    status, res = post(port, "/predict", {"input": x[0].tolist()})
    out["predict_status"], out["predict_label"] = status, res.get("label")
    out["install_sealed"] = agent.install(Path(sealed)).status
    out["serving_sealed"] = agent.current.manifest.version
    server.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
