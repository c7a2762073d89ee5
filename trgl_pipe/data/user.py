"""Datasets from user code: ``data.name: "pkg.mod:callable"`` returning ``(train, test)``.

Each of ``train`` and ``test`` is a map-style dataset of ``(image, label)`` items (the image a
tensor [C, H, W] or [H, W], or a PIL image; the label an int) or a pair of arrays ``(images,
labels)`` (images [N, C, H, W] or [N, H, W]; numpy or torch). They are read into memory once, as
the built-in datasets are: uint8 images stay uint8 (and are scaled by 1/255), other images become
float32 as they are. Validation hold-out, ``train_size``, class balance, sharding between
replicas and resume then work exactly as for the built-in datasets.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from trgl_pipe.data.readers import ImageSet, RawDataset
from trgl_pipe.errors import DataError

EXPECTED_ITEM = "(image tensor [C, H, W] or PIL image, int label)"


def _image_tensor(image: Any, where: str) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
    elif isinstance(image, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(image))
    elif hasattr(image, "mode") and hasattr(image, "size"):  # a PIL image
        t = torch.from_numpy(np.array(image, copy=True))
        t = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)
        return t.contiguous()
    else:
        raise DataError(f"{where} holds {type(image).__name__} images; expected {EXPECTED_ITEM}")
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3:
        raise DataError(f"{where} holds images of shape {list(t.shape)}; expected {EXPECTED_ITEM}")
    return t


def _label(label: Any, where: str) -> int:
    if isinstance(label, torch.Tensor) and label.numel() == 1 and not label.is_floating_point():
        return int(label)
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        return int(label)
    raise DataError(f"{where} has a label of type {type(label).__name__}; expected {EXPECTED_ITEM}")


def _as_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 stays uint8 (0..255); anything else becomes float32 as it is."""
    return images if images.dtype == torch.uint8 else images.float()


def _from_arrays(pair: Any, where: str) -> ImageSet:
    images, labels = (torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a for a in pair)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise DataError(
            f"{where} holds images of shape {list(images.shape)}; expected [N, C, H, W] or [N, H, W]"
        )
    if labels.dim() != 1 or labels.is_floating_point() or len(labels) != len(images):
        raise DataError(
            f"{where} holds labels of shape {list(labels.shape)} ({labels.dtype}); expected "
            f"{len(images)} integer labels"
        )
    if len(images) == 0:
        raise DataError(f"{where} is empty (0 images)")
    return ImageSet(_as_images(images.contiguous()), labels.long())


def _from_dataset(dataset: Any, where: str) -> ImageSet:
    try:
        n = len(dataset)
    except TypeError as error:
        raise DataError(f"{where} has no len(); expected a map-style Dataset or (images, labels)") from error
    if n == 0:
        raise DataError(f"{where} is empty")
    images, labels = [], []
    for i in range(n):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataError(f"{where} item {i} is {type(item).__name__}; expected {EXPECTED_ITEM}")
        images.append(_image_tensor(item[0], f"{where} item {i}"))
        labels.append(_label(item[1], f"{where} item {i}"))
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise DataError(f"{where} holds images of different shapes ({sorted(shapes)[:2]}); give one shape")
    dtypes = {t.dtype for t in images}
    stacked = torch.stack(images) if len(dtypes) == 1 else torch.stack([t.float() for t in images])
    return ImageSet(_as_images(stacked), torch.tensor(labels, dtype=torch.long))


def image_set(part: Any, where: str) -> ImageSet:
    """A training or test set the user gave, in memory."""
    if isinstance(part, (tuple, list)) and len(part) == 2:
        first = part[0]
        if isinstance(first, (np.ndarray, torch.Tensor)) and first.ndim >= 3:
            return _from_arrays(part, where)
    if hasattr(part, "__getitem__") and hasattr(part, "__len__") and not isinstance(part, (str, bytes)):
        return _from_dataset(part, where)
    raise DataError(
        f"{where} is a {type(part).__name__}; expected a map-style Dataset or (images, labels) arrays"
    )


def read_user_data(name: str, kwargs: dict[str, Any]) -> RawDataset:
    """Call ``data.name`` and read what it returns into a :class:`RawDataset`."""
    from trgl_pipe.plugins import call_user, load_callable

    result = call_user("data.name", name, load_callable("data.name", name), **kwargs)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise DataError(
            f"data.name={name} returned a {type(result).__name__}; expected (train, test): two "
            "map-style Datasets or two (images, labels) array pairs"
        )
    train = image_set(result[0], f"data.name={name}: the training set")
    test = image_set(result[1], f"data.name={name}: the test set")
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(
            f"data.name={name}: training images are {list(train.images.shape[1:])}, test images "
            f"{list(test.images.shape[1:])}; give both one shape"
        )
    low = min(int(train.labels.min()), int(test.labels.min()))
    if low < 0:
        raise DataError(f"data.name={name}: labels must be 0 or more, found {low}")
    num_classes = max(int(train.labels.max()), int(test.labels.max())) + 1
    if num_classes < 2:
        raise DataError(f"data.name={name}: every label is 0; a classifier needs at least 2 classes")
    return RawDataset(train, test, num_classes, name)
