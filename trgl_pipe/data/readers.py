"""Read datasets from disk into uint8 image tensors [N, C, H, W] and int64 labels [N].

Every reader raises :class:`~trgl_pipe.errors.DataError` with one line saying where it looked and
how to get the files. Layouts follow torchvision's, so a folder torchvision downloaded works.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from trgl_pipe.data.idx import IdxFormatError, read_idx
from trgl_pipe.errors import DataError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(slots=True)
class ImageSet:
    """Images as uint8 [N, C, H, W] and labels as int64 [N], kept in host memory."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index])


@dataclass(slots=True)
class RawDataset:
    """A dataset's training and test sets as read from disk, and where they came from."""

    train: ImageSet
    test: ImageSet
    num_classes: int
    origin: str  # a path or "embedded subset", for the logs


# ---------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST (IDX files)

_MNIST_FOLDERS = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}
_MNIST_HINT = {
    "fashion_mnist": "install Debian's dataset-fashion-mnist, or put the four *-ubyte.gz files of "
    "https://github.com/zalandoresearch/fashion-mnist there, or set data.source=download",
    "mnist": "put the four *-ubyte(.gz) files of MNIST there, or set data.source=download",
}


def _find_idx(folder: Path, stem: str) -> Path | None:
    for suffix in ("", ".gz", ".xz"):
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def read_mnist_folder(folder: Path, name: str, origin: str | None = None) -> RawDataset:
    """Read ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz|.xz]`` from ``folder``."""
    sets = {}
    for split in ("train", "t10k"):
        arrays = []
        for kind in ("images-idx3", "labels-idx1"):
            stem = f"{split}-{kind}-ubyte"
            path = _find_idx(folder, stem)
            if path is None:
                raise DataError(f"data.name={name}: missing {folder / stem}[.gz]; {_MNIST_HINT[name]}")
            try:
                arrays.append(read_idx(path))
            except IdxFormatError as error:
                raise DataError(f"data.name={name}: {error}; replace the file") from error
        images, labels = arrays
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"data.name={name}: {folder} holds {len(images)} {split} images of shape "
                f"{images.shape[1:]} but {len(labels)} labels; the files do not belong together"
            )
        sets[split] = ImageSet(
            torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
        )
    return RawDataset(sets["train"], sets["t10k"], 10, origin or str(folder))


def mnist_candidates(root: Path, name: str) -> list[Path]:
    """Folders that may hold the IDX files: torchvision's root/<Name>/raw, or root itself."""
    return [root / _MNIST_FOLDERS[name] / "raw", root]


def read_mnist_root(root: Path, name: str) -> RawDataset:
    for folder in mnist_candidates(root, name):
        if _find_idx(folder, "train-images-idx3-ubyte"):
            return read_mnist_folder(folder, name)
    raise DataError(
        f"data.name={name}: no train-images-idx3-ubyte[.gz] in {root / _MNIST_FOLDERS[name] / 'raw'} "
        f"or {root}; {_MNIST_HINT[name]}"
    )


def read_embedded_fashion_mnist() -> RawDataset:
    """The class-balanced 8,000/2,000 subset shipped inside the package (MIT licence)."""
    folder = resources.files("trgl_pipe.data") / "embedded" / "fashion_mnist_subset"
    with resources.as_file(folder) as path:
        return read_mnist_folder(Path(path), "fashion_mnist", origin="embedded subset (8000/2000)")


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickles)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that builds only numpy arrays and plain containers: no code from the file."""

    _allowed: frozenset[tuple[str, str]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> type:
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _load_pickle(path: Path, name: str) -> dict:
    try:
        with open(path, "rb") as handle:
            data = _ArrayUnpickler(handle, encoding="bytes").load()
    except FileNotFoundError:
        raise
    except Exception as error:
        raise DataError(f"data.name={name}: {path} is not a readable CIFAR batch ({error})") from error
    if not isinstance(data, dict):
        raise DataError(f"data.name={name}: {path} does not hold a CIFAR batch dictionary")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def _cifar_set(paths: list[Path], label_key: str, name: str) -> ImageSet:
    images, labels = [], []
    for path in paths:
        batch = _load_pickle(path, name)
        if "data" not in batch or label_key not in batch:
            raise DataError(f"data.name={name}: {path} lacks 'data' or '{label_key}'")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(
                f"data.name={name}: {path} holds images of shape {data.shape}, expected [N, 3072]"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return ImageSet(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


def read_cifar(root: Path, name: str) -> RawDataset:
    if name == "cifar10":
        folder, train_files, test_files, key, classes = (
            root / "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            ["test_batch"],
            "labels",
            10,
        )
        url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    else:
        folder, train_files, test_files, key, classes = (
            root / "cifar-100-python",
            ["train"],
            ["test"],
            "fine_labels",
            100,
        )
        url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    missing = [f for f in train_files + test_files if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"data.name={name}: missing {folder / missing[0]}; extract {url} into {root} "
            "(or set data.source=download where there is internet)"
        )
    train = _cifar_set([folder / f for f in train_files], key, name)
    test = _cifar_set([folder / f for f in test_files], key, name)
    return RawDataset(train, test, classes, str(folder))


# ---------------------------------------------------------------------------------------------
# STL-10 (binary files)


def _read_stl_split(folder: Path, split: str) -> ImageSet:
    x_path, y_path = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
    for path in (x_path, y_path):
        if not path.is_file():
            raise DataError(
                f"data.name=stl10: missing {path}; extract "
                "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz into data.root"
            )
    raw = np.fromfile(x_path, dtype=np.uint8)
    labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1  # files count from 1
    if raw.size % (3 * 96 * 96) or raw.size // (3 * 96 * 96) != labels.size:
        raise DataError(
            f"data.name=stl10: {x_path} holds {raw.size} bytes, which is not 3x96x96 bytes for each "
            f"of the {labels.size} labels in {y_path}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"data.name=stl10: {y_path} has labels outside 1..10")
    # stored column-major per channel: transpose H and W
    images = raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
    return ImageSet(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))


def read_stl10(root: Path) -> RawDataset:
    folder = root / "stl10_binary"
    return RawDataset(_read_stl_split(folder, "train"), _read_stl_split(folder, "test"), 10, str(folder))


# ---------------------------------------------------------------------------------------------
# Synthetic: class prototypes plus noise, learnable and of any shape


def make_synthetic(
    num_train: int, num_test: int, channels: int, image_size: int, num_classes: int, seed: int
) -> RawDataset:
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randint(0, 256, (num_classes, channels, image_size, image_size), generator=gen)

    def draw(n: int) -> ImageSet:
        labels = torch.randint(0, num_classes, (n,), generator=gen)
        noise = torch.randint(-64, 65, (n, channels, image_size, image_size), generator=gen)
        images = (prototypes[labels] + noise).clamp(0, 255).to(torch.uint8)
        return ImageSet(images, labels)

    return RawDataset(draw(num_train), draw(num_test), num_classes, "synthetic")


# ---------------------------------------------------------------------------------------------
# Download through torchvision where there is internet


def download(name: str, root: Path) -> None:
    """Fetch a dataset into ``root`` in torchvision's layout (needs internet)."""
    import torchvision.datasets as tvd

    makers: dict[str, Callable[[], object]] = {
        "fashion_mnist": lambda: [tvd.FashionMNIST(str(root), train=t, download=True) for t in (True, False)],
        "mnist": lambda: [tvd.MNIST(str(root), train=t, download=True) for t in (True, False)],
        "cifar10": lambda: tvd.CIFAR10(str(root), download=True),
        "cifar100": lambda: tvd.CIFAR100(str(root), download=True),
        "stl10": lambda: tvd.STL10(str(root), download=True),
    }
    if name not in makers:
        raise DataError(f"data.source=download is not available for data.name={name}")
    try:
        makers[name]()
    except Exception as error:  # network errors come in many types
        raise DataError(
            f"data.name={name}: download into {root} failed ({error}); fetch the files by hand"
        ) from error
