"""Image datasets stored as files (TinyImageNet, ImageNet-style class folders), decoded once.

JPEG decoding costs far more than a training step of a small network, so a folder is decoded
once into a uint8 array file (N×C×H×W, plus the labels) and every later run memory-maps it: no
epoch decodes again. The cache sits in ``data.cache_dir`` (default: a ``.trgl_pipe_cache``
folder next to the data, or ``~/.cache/trgl_pipe`` where the data folder is read-only) and its
name carries a fingerprint of the files it came from (paths, sizes, modification times), so a
changed folder is decoded again and the stale cache removed. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from trgl_pipe.data.readers import ImageSet, RawDataset
from trgl_pipe.errors import DataError
from trgl_pipe.io import atomic_write_text

Item = tuple[Path, int]  # an image file and its label


def _fingerprint(items: list[Item], extra: list[Path], image_size: int) -> str:
    digest = hashlib.sha1(f"v1 {image_size}".encode())
    for path in sorted([p for p, _ in items] + extra):
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    for path, label in items:
        digest.update(f"{path.name}:{label};".encode())
    return digest.hexdigest()[:16]


def cache_folder(root: Path, cache_dir: str | None) -> Path:
    """Where the decoded arrays of the dataset at ``root`` live."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    beside = root / ".trgl_pipe_cache"
    if os.access(root, os.W_OK):
        return beside
    return Path.home() / ".cache" / "trgl_pipe" / hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]


def _decode(path: Path, image_size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, UnidentifiedImageError) as error:
        raise DataError(
            f"cannot decode image {path} ({type(error).__name__}); replace or remove it"
        ) from error


def decoded(
    name: str, items: list[Item], image_size: int, cache: Path, extra: list[Path], threads: int = 0
) -> ImageSet:
    """``items`` as a uint8 ImageSet, decoded once into ``cache`` and memory-mapped afterwards."""
    key = _fingerprint(items, extra, image_size)
    stem = f"{name}-{image_size}px-{key}"
    array_path, meta_path = cache / f"{stem}.u8", cache / f"{stem}.json"
    shape = (len(items), 3, image_size, image_size)
    if not meta_path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        for stale in cache.glob(f"{name}-{image_size}px-*"):  # the folder changed since
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=cache)
        os.close(fd)
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            with ThreadPoolExecutor(max(1, threads)) as pool:
                for i, pixels in enumerate(pool.map(lambda item: _decode(item[0], image_size), items)):
                    out[i] = pixels
            out.flush()
            del out
            os.replace(tmp, array_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        labels = [label for _, label in items]
        atomic_write_text(meta_path, json.dumps({"shape": shape, "labels": labels, "source": name}))
    meta = json.loads(meta_path.read_text())
    images = np.load(array_path, mmap_mode="c")  # copy-on-write: pages stay shared and on disk
    return ImageSet(torch.from_numpy(images), torch.tensor(meta["labels"], dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# TinyImageNet


def _lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise DataError(
            f"data.name=tiny_imagenet: {path} is missing ({what}); point data.root at the "
            "extracted tiny-imagenet-200 folder"
        )
    return [line for line in path.read_text().splitlines() if line.strip()]


def read_tiny_imagenet(root: Path, cache_dir: str | None, threads: int = 0) -> RawDataset:
    """TinyImageNet as distributed: ``wnids.txt``, ``train/<wnid>/images/*.JPEG`` (with
    ``<wnid>_boxes.txt``), ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt``; the
    unlabelled ``test`` folder is ignored. Classes are numbered in the sorted order of the wnids.
    Our test split is the official val split; validation is held out from train as everywhere."""
    wnids = sorted(_lines(root / "wnids.txt", "the list of the 200 class ids"))
    if len(set(wnids)) != len(wnids):
        raise DataError(f"data.name=tiny_imagenet: {root / 'wnids.txt'} lists a class id twice")
    index = {w: i for i, w in enumerate(wnids)}
    train: list[Item] = []
    for wnid in wnids:
        folder = root / "train" / wnid / "images"
        files = sorted(folder.glob("*.JPEG")) if folder.is_dir() else []
        if not files:
            raise DataError(f"data.name=tiny_imagenet: no images in {folder} (class {wnid} of wnids.txt)")
        train += [(f, index[wnid]) for f in files]
    annotations = root / "val" / "val_annotations.txt"
    val: list[Item] = []
    for n, line in enumerate(_lines(annotations, "the labels of the val images"), start=1):
        fields = line.split("\t")
        if len(fields) < 2:
            raise DataError(f"data.name=tiny_imagenet: {annotations} line {n} is not 'file<TAB>wnid<TAB>box'")
        file, wnid = fields[0], fields[1]
        if wnid not in index:
            raise DataError(
                f"data.name=tiny_imagenet: {annotations} line {n} names class {wnid}, not in wnids.txt"
            )
        path = root / "val" / "images" / file
        if not path.is_file():
            raise DataError(f"data.name=tiny_imagenet: {annotations} line {n} names {path}, which is missing")
        val.append((path, index[wnid]))
    cache = cache_folder(root, cache_dir)
    listing = [root / "wnids.txt", annotations]
    return RawDataset(
        decoded("tiny_imagenet-train", train, 64, cache, listing, threads),
        decoded("tiny_imagenet-val", val, 64, cache, listing, threads),
        len(wnids),
        str(root),
    )


# ---------------------------------------------------------------------------------------------
# ImageNet-style class folders: root/train/<class>/*, root/{val,test}/<class>/*

_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp"}


def _class_folder_items(folder: Path, classes: list[str] | None) -> tuple[list[Item], list[str]]:
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = classes or found
    if found != classes:
        raise DataError(f"data.name=image_folder: {folder} and the train folder have different class folders")
    items = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in _EXTENSIONS)
        if not files and classes is found:  # the training folder decides the classes
            raise DataError(
                f"data.name=image_folder: class folder {folder / name} holds no images "
                f"({', '.join(sorted(_EXTENSIONS))}); add its images or remove the folder"
            )
        items += [(p, label) for p in files]
    if not items:
        raise DataError(f"data.name=image_folder: no images under {folder}/<class>/")
    return items, classes


def read_image_folder(root: Path, image_size: int, cache_dir: str | None, threads: int = 0) -> RawDataset:
    train_dir = root / "train"
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(
            f"data.name=image_folder: expected {train_dir}/<class>/<image> and {root}/val (or test)/"
            "<class>/<image>; arrange the images in one folder per class"
        )
    train, classes = _class_folder_items(train_dir, None)
    test, _ = _class_folder_items(test_dir, classes)
    cache = cache_folder(root, cache_dir)
    return RawDataset(
        decoded("image_folder-train", train, image_size, cache, [], threads),
        decoded(f"image_folder-{test_dir.name}", test, image_size, cache, [], threads),
        len(classes),
        str(root),
    )
