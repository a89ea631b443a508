"""Train the digits example (scikit-learn's bundled 8x8 digits; no download) and write
model + calibration/validation/training data + metadata.

    python examples/train_digits.py [--out examples/digits] [--outlier]

--outlier writes a model whose plain int8 conversion breaks (one huge constant activation), to see
selective quantization repair it:  edgeship build examples/digits/digits-outlier.keras -p rpi4-arm64 ...
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit.examples import write_digits  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "digits"))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--outlier", action="store_true")
    a = ap.parse_args()
    for k, v in write_digits(a.out, epochs=a.epochs, outlier=a.outlier).items():
        print(f"{k:<12} {v}")
