"""Datasets held in memory as uint8 tensors, split into train/val/test, batched deterministically.

Batches depend only on (seed, epoch, batch index): the shuffle of each epoch and the augmentation
of each batch come from generators seeded by those numbers. The same run therefore sees the same
batches in every regime, in the pipeline, and after a resume from the middle of an epoch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from trgl_pipe.config import DataConfig
from trgl_pipe.data import folders, readers
from trgl_pipe.data.readers import ImageSet, RawDataset
from trgl_pipe.errors import DataError

__all__ = [
    "Batches",
    "DataSplits",
    "ImageSet",
    "load_data",
    "resolve_source",
    "shard_bounds",
    "steps_per_epoch",
]


@dataclass(slots=True)
class DataSplits:
    """Train, validation (held out from train) and test sets, plus what the model needs to know."""

    train: ImageSet
    val: ImageSet
    test: ImageSet
    num_classes: int
    channels: int
    image_size: int
    mean: torch.Tensor  # per channel, in [0, 1], from the training images
    std: torch.Tensor
    origin: str

    def describe(self) -> str:
        return (
            f"{len(self.train)} train / {len(self.val)} val / {len(self.test)} test images of "
            f"{self.channels}x{self.image_size}x{self.image_size}, {self.num_classes} classes, "
            f"from {self.origin}"
        )


def resolve_source(cfg: DataConfig) -> str:
    """Which source ``data.source=auto`` means on this machine."""
    if cfg.name == "synthetic":
        return "synthetic"
    if cfg.root and cfg.source in ("embedded", "debian"):
        # a data.root given on top of a config that reads a packaged copy: the root is meant
        print(f"data.root={cfg.root} given: reading from it, not from data.source={cfg.source}", flush=True)
        return "root"
    if cfg.source != "auto":
        return cfg.source
    if cfg.root:
        return "root"
    if cfg.name == "fashion_mnist":
        if (readers.DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
            return "debian"
        return "embedded"
    raise DataError(
        f"data.name={cfg.name} needs data.root (the folder that holds it in torchvision's layout)"
    )


def _read_raw(cfg: DataConfig, seed: int) -> RawDataset:
    if cfg.is_user:
        from trgl_pipe.data.user import read_user_data

        return read_user_data(cfg.name, cfg.kwargs)
    if cfg.name == "synthetic":
        return readers.make_synthetic(
            cfg.train_size or 2048,
            cfg.test_size or 512,
            cfg.channels,
            cfg.image_size,
            cfg.num_classes,
            seed,
        )
    source = resolve_source(cfg)
    if source == "embedded":
        if cfg.name != "fashion_mnist":
            raise DataError(f"data.source=embedded holds Fashion-MNIST only, not data.name={cfg.name}")
        return readers.read_embedded_fashion_mnist()
    if source == "debian":
        if cfg.name != "fashion_mnist":
            raise DataError(f"data.source=debian holds Fashion-MNIST only, not data.name={cfg.name}")
        return readers.read_mnist_folder(readers.DEBIAN_FASHION_MNIST, "fashion_mnist")
    root = Path(cfg.root or Path.home() / ".cache" / "trgl_pipe" / "data").expanduser()
    if source == "download":
        readers.download(cfg.name, root)
    if not root.is_dir():
        raise DataError(f"data.root={root} is not a folder; point it at the folder that holds {cfg.name}")
    if cfg.name in ("fashion_mnist", "mnist"):
        return readers.read_mnist_root(root, cfg.name)
    if cfg.name in ("cifar10", "cifar100"):
        return readers.read_cifar(root, cfg.name)
    if cfg.name == "stl10":
        return readers.read_stl10(root)
    if cfg.name == "tiny_imagenet":
        return folders.read_tiny_imagenet(root, cfg.cache_dir, cfg.num_workers)
    return folders.read_image_folder(root, cfg.image_size, cfg.cache_dir, cfg.num_workers)


def load_data(cfg: DataConfig, seed: int) -> DataSplits:
    """Read the dataset, hold out ``val_size`` training images, apply ``train_size``/``test_size``."""
    raw = _read_raw(cfg, seed)
    order = torch.randperm(len(raw.train), generator=torch.Generator().manual_seed(seed))
    if cfg.val_size >= len(raw.train):
        raise DataError(
            f"data.val_size={cfg.val_size} leaves no training images out of {len(raw.train)}; lower it"
        )
    val = raw.train.subset(order[: cfg.val_size])
    rest = order[cfg.val_size :]
    if cfg.train_size is not None and cfg.name != "synthetic":
        if cfg.train_size > len(rest):
            raise DataError(
                f"data.train_size={cfg.train_size} is more than the {len(rest)} training images left "
                f"after data.val_size={cfg.val_size}; lower one of them"
            )
        rest = (
            _balanced(rest, raw.train.labels, cfg.train_size)
            if cfg.class_balanced
            else rest[: cfg.train_size]
        )
    train = raw.train.subset(rest)
    test = raw.test
    if cfg.test_size is not None and cfg.name != "synthetic":
        test = test.subset(torch.arange(min(cfg.test_size, len(test))))
    bad = int(((train.labels < 0) | (train.labels >= raw.num_classes)).sum())
    if bad:
        raise DataError(f"data.name={cfg.name}: {bad} training labels are outside 0..{raw.num_classes - 1}")
    pixels = train.images.float().div_(255) if train.images.dtype == torch.uint8 else train.images.float()
    mean = pixels.mean(dim=(0, 2, 3))
    std = pixels.std(dim=(0, 2, 3)).clamp_min(1e-3)
    _, channels, height, width = train.images.shape
    if height != width:
        raise DataError(
            f"data.name={cfg.name}: images are {height}x{width}; only square images are supported"
        )
    return DataSplits(train, val, test, raw.num_classes, channels, height, mean, std, raw.origin)


def _balanced(order: torch.Tensor, labels: torch.Tensor, size: int) -> torch.Tensor:
    """The first ``size`` indices of ``order`` that hold equally many images of each class.

    When the classes do not divide ``size``, the lowest class labels get one image more.
    """
    classes = torch.unique(labels[order])
    base, extra = divmod(size, len(classes))
    chosen = []
    for i, c in enumerate(classes.tolist()):
        wanted = base + (1 if i < extra else 0)
        of_class = order[labels[order] == c]
        if len(of_class) < wanted:
            raise DataError(
                f"data.class_balanced: class {c} has {len(of_class)} training images left, "
                f"data.train_size={size} needs {wanted}; lower data.train_size or data.val_size"
            )
        chosen.append(of_class[:wanted])
    picked = torch.cat(chosen)
    keep = torch.zeros(len(labels), dtype=torch.bool)
    keep[picked] = True
    return order[keep[order]]  # in the seeded order, not grouped by class


def shard_bounds(n: int, replica: int, replicas: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a batch of ``n`` that replica ``replica`` of ``replicas`` takes.

    Contiguous shards whose sizes differ by at most one (the first ``n % replicas`` get one more).
    """
    base, extra = divmod(n, replicas)
    start = replica * base + min(replica, extra)
    return start, start + base + (1 if replica < extra else 0)


def steps_per_epoch(num_train: int, batch_size: int, replicas: int = 1) -> int:
    """Training batches per epoch; a last partial batch too small to give every replica a sample
    is dropped (a replica cannot take a step on no data)."""
    full, rest = divmod(num_train, batch_size)
    return full + (1 if rest >= replicas else 0)


class Batches:
    """Deterministic float batches of a :class:`DataSplits` for training and evaluation.

    ``shard=(r, R)``: replica r of R data-parallel replicas gets rows :func:`shard_bounds` of
    every batch, and gathers, augments and normalises only those (so the input of each replica
    shrinks as R grows). The global batch and its augmentation do not depend on R.
    """

    def __init__(
        self,
        data: DataSplits,
        cfg: DataConfig,
        seed: int,
        shard: tuple[int, int] = (0, 1),
        pin_memory: bool = False,
    ) -> None:
        self.data = data
        self.batch_size = cfg.batch_size
        self.eval_batch_size = cfg.eval_batch_size
        self.augment = cfg.augment
        self.prefetch = cfg.num_workers
        self.seed = seed
        self.replica, self.replicas = shard
        self.pin_memory = pin_memory  # page-locked batches: non_blocking copies to a GPU really are
        default_padding = 2 if data.image_size <= 28 else 4
        self.padding = default_padding if cfg.crop_padding is None else cfg.crop_padding
        self._mean = data.mean.view(1, -1, 1, 1)
        self._std = data.std.view(1, -1, 1, 1)

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.data.train), self.batch_size, self.replicas)

    @property
    def max_batch(self) -> int:
        return max(self.batch_size, self.eval_batch_size)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.data.channels, self.data.image_size, self.data.image_size)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images to standardised floats, with the same operations an exported model uses
        (float images of a user dataset are standardised as they are, without the 1/255)."""
        if images.dtype != torch.uint8:
            return (images.float() - self._mean) / self._std
        return (images.float() / 255 - self._mean) / self._std

    def _finish(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalize(images)
        if self.pin_memory:
            x, labels = x.pin_memory(), labels.pin_memory()
        return x, labels

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start..`` of ``epoch`` (this replica's shard); the last may be smaller."""
        gen = torch.Generator().manual_seed(_mix(self.seed, 1, epoch))
        order = torch.randperm(len(self.data.train), generator=gen)

        def produce() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for b in range(start, self.steps_per_epoch):
                index = order[b * self.batch_size : (b + 1) * self.batch_size]
                lo, hi = shard_bounds(len(index), self.replica, self.replicas)
                images = self.data.train.images[index[lo:hi]]
                if self.augment:
                    images = self._augment(images, _mix(self.seed, 2, epoch, b), len(index), lo)
                yield self._finish(images, self.data.train.labels[index[lo:hi]])

        return _prefetched(produce(), self.prefetch) if self.prefetch else produce()

    def eval_batches(self, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every batch of ``split`` in order (this replica's shard, which may be empty)."""
        images = getattr(self.data, split)
        for i in range(0, len(images), self.eval_batch_size):
            n = min(self.eval_batch_size, len(images) - i)
            lo, hi = shard_bounds(n, self.replica, self.replicas)
            chunk = slice(i + lo, i + hi)
            yield self._finish(images.images[chunk], images.labels[chunk])

    def _augment(self, images: torch.Tensor, seed: int, n: int, first: int) -> torch.Tensor:
        """Random crop after zero padding, and a random horizontal flip, per image.

        The random numbers are drawn for the whole batch of ``n`` and this shard uses rows
        ``first..``, so an image is augmented the same way whatever the number of replicas.
        """
        gen = torch.Generator().manual_seed(seed)
        m, _, h, w = images.shape
        p = self.padding
        padded = torch.nn.functional.pad(images, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)[first : first + m]
        dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)[first : first + m]
        flip = (torch.rand(n, generator=gen) < 0.5)[first : first + m]
        rows = dy[:, None] + torch.arange(h)[None, :]
        cols = dx[:, None] + torch.arange(w)[None, :]
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        batch = torch.arange(m)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()


def _mix(*numbers: int) -> int:
    value = 0
    for n in numbers:
        value = (value * 1_000_003 + n + 1) & 0x7FFFFFFFFFFFFFFF
    return value


def _prefetched(items: Iterator, depth: int) -> Iterator:
    """Run ``items`` in a background thread, ``depth`` items ahead (bounded)."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def fill() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(done)
        except BaseException as error:  # hand the error to the consumer
            slots.put(error)

    thread = threading.Thread(target=fill, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
