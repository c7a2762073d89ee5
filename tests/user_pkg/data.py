"""User datasets: numpy arrays, and map-style Datasets of PIL images, for ``data.name``."""

from __future__ import annotations

import numpy as np
from PIL import Image
from torch.utils.data import Dataset


def arrays(n_train: int = 240, n_test: int = 60, size: int = 14, seed: int = 0):
    """Four classes of 1x14x14 uint8 images on noise: class c brightens quadrant c by 90 + 40c
    (where and how bright: learnable in a few steps by maps, vectors and averaged tokens alike)."""
    rng = np.random.default_rng(seed)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % 4
        images = rng.integers(0, 40, size=(n, size, size), dtype=np.uint8)
        half = size // 2
        for i, c in enumerate(labels):
            r, q = divmod(int(c), 2)
            images[i, r * half : (r + 1) * half, q * half : (q + 1) * half] += 90 + 40 * int(c)
        return images[:, None], labels

    return make(n_train), make(n_test)


class PilImages(Dataset):
    """The same images as :func:`arrays`, as (PIL image, int) items."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return Image.fromarray(self.images[i, 0]), int(self.labels[i])


def datasets(n_train: int = 240, n_test: int = 60):
    (xtr, ytr), (xte, yte) = arrays(n_train, n_test)
    return PilImages(xtr, ytr), PilImages(xte, yte)


def wrong_items():
    """Items that are not (image, label)."""
    return ["a", "b"], ["c"]


def not_a_pair():
    return {"train": None}


def floats():
    """Float images (not uint8) with 3 classes: standardised as they are."""
    import torch

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(60, 1, 6, 6, generator=gen) * 4 - 1
    labels = torch.arange(60) % 3
    return (images, labels), (images[:12], labels[:12])
