"""Rebuild the Fashion-MNIST subset shipped in ``trgl_pipe/data/embedded/fashion_mnist_subset``.

The subset lets the quickstart run offline on a fresh machine. It is class-balanced and drawn
with a fixed seed, so running this script again on the same source files gives the same bytes.

    python scripts/make_embedded_subset.py /usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

import argparse
import lzma
from pathlib import Path

import numpy as np

from trgl_pipe.data.idx import read_idx, write_idx

TRAIN_PER_CLASS = 800
TEST_PER_CLASS = 200
SEED = 20170825  # Fashion-MNIST's release date; any fixed number would do


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``per_class`` random indices of each class, then shuffle them together."""
    chosen = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)]
    picked = np.concatenate(chosen)
    rng.shuffle(picked)
    return picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder with the four *-ubyte.gz files")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "trgl_pipe/data/embedded/fashion_mnist_subset",
    )
    args = parser.parse_args()
    rng = np.random.default_rng(SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", TRAIN_PER_CLASS), ("t10k", TEST_PER_CLASS)):
        images = read_idx(args.source / f"{split}-images-idx3-ubyte.gz")
        labels = read_idx(args.source / f"{split}-labels-idx1-ubyte.gz")
        keep = balanced_indices(labels, per_class, rng)
        for name, array in (("images-idx3", images[keep]), ("labels-idx1", labels[keep])):
            path = args.out / f"{split}-{name}-ubyte.xz"
            with lzma.open(path, "wb", preset=9 | lzma.PRESET_EXTREME) as handle:
                write_idx(handle, array)
            print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {len(keep)} items)")


if __name__ == "__main__":
    main()
