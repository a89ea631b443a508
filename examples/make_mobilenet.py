"""Write a MobileNetV2-shaped Keras model (keras.applications, weights=None: no download) and random
calibration/validation images, for benchmarks and realistic-size builds.

    python examples/make_mobilenet.py [--out examples/mobilenet] [--size 224]
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit.examples import mobilenet_v2  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "mobilenet"))
    ap.add_argument("--size", type=int, default=224)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = mobilenet_v2(a.size)
    model.save(out / "mobilenet_v2.keras")
    rng = np.random.default_rng(0)
    name = model.input_names[0]
    np.savez(out / "calibration.npz", **{name: rng.random((64, a.size, a.size, 3), np.float32) * 2 - 1})
    np.savez(out / "validation.npz", **{name: rng.random((32, a.size, a.size, 3), np.float32) * 2 - 1})
    print(f"wrote {out}/mobilenet_v2.keras, calibration.npz, validation.npz (input {name!r})")
