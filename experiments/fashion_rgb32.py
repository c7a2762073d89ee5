"""Fashion-MNIST as 3×32×32 images, for networks that take only those (``data.name`` plug-in).

The authors' STL-10 scripts build a first convolution of 3 input channels and average-pool the
third and fourth modules' 8×8 maps with a kernel of 8, so the smallest image they accept is
3×32×32. Each 28×28 Fashion-MNIST image is padded with 2 rows and columns of zeros on every side
(its background is already 0) and its one channel repeated three times; labels are unchanged.
Used as ``data.name=fashion_rgb32:fashion_mnist_rgb32`` by experiments/parity_authors.py.
"""

from __future__ import annotations

import torch

from trgl_pipe.data import readers


def _rgb32(images: torch.Tensor) -> torch.Tensor:
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))  # [N, 1, 32, 32], uint8
    return padded.expand(-1, 3, -1, -1).contiguous()


def fashion_mnist_rgb32() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, test) as (uint8 images [N, 3, 32, 32], labels) from Debian's dataset-fashion-mnist."""
    raw = readers.read_mnist_folder(readers.DEBIAN_FASHION_MNIST, "fashion_mnist")
    return (
        (_rgb32(raw.train.images), raw.train.labels),
        (_rgb32(raw.test.images), raw.test.labels),
    )
