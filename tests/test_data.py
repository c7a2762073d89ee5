"""Loaders on small files written here in torchvision's layouts, and deterministic batching."""

from __future__ import annotations

import gzip
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_imagenet

from trgl_pipe.config import DataConfig
from trgl_pipe.data import Batches, load_data, shard_bounds, steps_per_epoch
from trgl_pipe.data.folders import read_image_folder, read_tiny_imagenet
from trgl_pipe.data.idx import write_idx
from trgl_pipe.data.readers import read_cifar, read_mnist_root, read_stl10
from trgl_pipe.errors import DataError

RNG = np.random.default_rng(0)


def _write_mnist(folder: Path, n_train: int = 40, n_test: int = 20, gz: bool = True) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": RNG.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": RNG.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": RNG.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": RNG.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        opener = gzip.open if gz else open
        with opener(folder / (name + (".gz" if gz else "")), "wb") as handle:
            write_idx(handle, array)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_in_torchvision_layout(tmp_path: Path, gz: bool) -> None:
    arrays = _write_mnist(tmp_path / "FashionMNIST" / "raw", gz=gz)
    data = read_mnist_root(tmp_path, "fashion_mnist")
    assert data.train.images.shape == (40, 1, 28, 28)
    assert np.array_equal(data.train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(data.test.labels.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_mnist_flat_folder_like_debian(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    assert len(read_mnist_root(tmp_path, "mnist").train) == 40


def test_missing_and_malformed_mnist(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no train-images-idx3-ubyte\[.gz\] in .*FashionMNIST/raw"):
        read_mnist_root(tmp_path, "fashion_mnist")
    _write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x28abc")
    )
    with pytest.raises(DataError, match="expected 40 bytes of data"):
        read_mnist_root(tmp_path, "fashion_mnist")


def _write_cifar(root: Path, hundred: bool) -> tuple[np.ndarray, list[int]]:
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    key = b"fine_labels" if hundred else b"labels"
    files = ["train", "test"] if hundred else [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    first = None
    for name in files:
        data = RNG.integers(0, 256, (6, 3072), dtype=np.uint8)
        labels = [int(v) for v in RNG.integers(0, 100 if hundred else 10, 6)]
        first = first or (data, labels)
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": data, key: labels, b"batch_label": b"x"}, handle)
    return first


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_pickles(tmp_path: Path, hundred: bool) -> None:
    data0, labels0 = _write_cifar(tmp_path, hundred)
    data = read_cifar(tmp_path, "cifar100" if hundred else "cifar10")
    assert data.num_classes == (100 if hundred else 10)
    assert len(data.train) == (6 if hundred else 30) and len(data.test) == 6
    assert np.array_equal(data.train.images[:6].reshape(6, -1).numpy(), data0)
    assert data.train.labels[:6].tolist() == labels0


def test_cifar_refuses_code_in_a_pickle(tmp_path: Path) -> None:
    _write_cifar(tmp_path, hundred=False)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as handle:
        pickle.dump({b"data": Evil(), b"labels": []}, handle)
    with pytest.raises(DataError, match=r"refusing to load builtins\.print"):
        read_cifar(tmp_path, "cifar10")


def test_cifar_missing_says_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing .*cifar-10-batches-py/data_batch_1; extract https://"):
        read_cifar(tmp_path, "cifar10")


def test_stl10_binary_is_read_column_major(tmp_path: Path) -> None:
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    images = RNG.integers(0, 256, (3, 3, 96, 96), dtype=np.uint8)  # N, C, H, W as we expect them
    labels = np.array([1, 10, 5], dtype=np.uint8)
    for split in ("train", "test"):
        images.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")  # the file stores W before H
        labels.tofile(folder / f"{split}_y.bin")
    data = read_stl10(tmp_path)
    assert np.array_equal(data.train.images.numpy(), images)
    assert data.test.labels.tolist() == [0, 9, 4]
    (folder / "test_y.bin").write_bytes(b"\x01")
    with pytest.raises(DataError, match="is not 3x96x96 bytes for each of the 1 labels"):
        read_stl10(tmp_path)


def test_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for name in ["cat", "dog"]:
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    data = read_image_folder(tmp_path, image_size=16, cache_dir=None, threads=2)
    assert data.train.images.shape == (6, 3, 16, 16) and data.num_classes == 2
    assert sorted(data.test.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert len(list((tmp_path / ".trgl_pipe_cache").glob("*.u8"))) == 2  # decoded once, cached


def test_image_folder_needs_train_and_val(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="one folder per class"):
        read_image_folder(tmp_path, 16, None)


def test_tiny_imagenet_in_its_distributed_layout(tmp_path: Path, monkeypatch) -> None:
    root = make_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    data = read_tiny_imagenet(root, None)
    assert data.num_classes == 3 and data.train.images.shape == (12, 3, 64, 64)
    assert data.test.images.shape == (6, 3, 64, 64)
    # classes in the sorted order of the wnids, whatever the order of wnids.txt
    assert data.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert data.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert int(data.train.images[5, 0, 10, 10]) in range(40 + 1 - 3, 40 + 1 + 4)  # JPEG: close to 41
    assert data.train.images[0].shape == (3, 64, 64)  # the grayscale JPEG became RGB
    # a second read maps the cache and decodes nothing
    import trgl_pipe.data.folders as folders

    monkeypatch.setattr(folders, "_decode", lambda *a: (_ for _ in ()).throw(AssertionError("decoded again")))
    again = read_tiny_imagenet(root, None)
    assert torch.equal(again.train.images, data.train.images)
    # a changed folder is decoded again (and the stale cache goes)
    monkeypatch.undo()
    (root / "val" / "images" / "val_0.JPEG").unlink()
    lines = (root / "val" / "val_annotations.txt").read_text().splitlines()[1:]
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    assert len(read_tiny_imagenet(root, None).test) == 5
    assert len(list((root / ".trgl_pipe_cache").glob("tiny_imagenet-val-*.u8"))) == 1


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda r: (r / "wnids.txt").unlink(), r"wnids.txt is missing \(the list of the 200 class ids\)"),
        (lambda r: shutil.rmtree(r / "train" / "n01629819" / "images"), r"no images in .*n01629819/images"),
        (lambda r: (r / "val" / "val_annotations.txt").unlink(), "val_annotations.txt is missing"),
        (
            lambda r: (r / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n"),
            "line 1 names class n99999999, not in wnids.txt",
        ),
        (
            lambda r: (r / "val" / "images" / "val_3.JPEG").unlink(),
            r"line 4 names .*val_3.JPEG, which is missing",
        ),
        (
            lambda r: (r / "train" / "n01443537" / "images" / "n01443537_1.JPEG").write_bytes(b"no jpeg"),
            r"cannot decode image .*n01443537_1.JPEG",
        ),
    ],
    ids=[
        "no-wnids",
        "no-class-folder",
        "no-annotations",
        "unknown-class",
        "missing-val-image",
        "corrupt-jpeg",
    ],
)
def test_a_malformed_tiny_imagenet_gets_one_line(tmp_path: Path, break_it, message: str) -> None:
    root = make_tiny_imagenet(tmp_path / "tiny")
    break_it(root)
    with pytest.raises(DataError, match=message):
        read_tiny_imagenet(root, str(tmp_path / "cache"))
    assert not list((tmp_path / "cache").glob("*.tmp"))  # nothing half-written left


def test_embedded_subset_splits_and_sizes() -> None:
    cfg = DataConfig(source="embedded", val_size=500, train_size=1000, test_size=300)
    data = load_data(cfg, seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (1000, 500, 300)
    assert data.channels == 1 and data.image_size == 28 and data.num_classes == 10
    with pytest.raises(DataError, match=r"data\.train_size=9000 is more than the 7500"):
        load_data(DataConfig(source="embedded", val_size=500, train_size=9000), seed=0)


def test_validation_is_held_out_from_training() -> None:
    data = load_data(DataConfig(source="embedded", val_size=200), seed=3)
    train = {bytes(img.numpy()) for img in data.train.images}
    assert not any(bytes(img.numpy()) in train for img in data.val.images)


def test_batches_depend_only_on_seed_epoch_and_index() -> None:
    cfg = DataConfig(source="embedded", val_size=100, train_size=300, batch_size=64, augment=True)
    data = load_data(cfg, seed=0)
    a, b = Batches(data, cfg, seed=0), Batches(data, cfg, seed=0)
    first = list(a.train_batches(epoch=1))
    assert [len(y) for _, y in first] == [64, 64, 64, 64, 44]
    resumed = list(b.train_batches(epoch=1, start=3))
    for (x1, y1), (x2, y2) in zip(first[3:], resumed, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other_epoch = next(a.train_batches(epoch=2))[1]
    assert not torch.equal(first[0][1], other_epoch)


def test_augmentation_crops_and_flips() -> None:
    cfg = DataConfig(source="embedded", val_size=100, train_size=300, batch_size=64)
    data = load_data(cfg, seed=0)
    plain = Batches(data, cfg, seed=0)
    images = data.train.images[:64]
    out = plain._augment(images, seed=1, n=64, first=0)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(out, images)
    assert torch.equal(out, plain._augment(images, seed=1, n=64, first=0))
    # every augmented image is a shifted, possibly mirrored crop of the zero-padded original
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(8):
        found = any(
            torch.equal(out[i], cand) or torch.equal(out[i], cand.flip(-1))
            for dy in range(5)
            for dx in range(5)
            for cand in [padded[i, :, dy : dy + 28, dx : dx + 28]]
        )
        assert found


def test_prefetch_gives_the_same_batches() -> None:
    cfg = DataConfig(source="embedded", val_size=100, train_size=300, batch_size=64)
    data = load_data(cfg, seed=0)
    direct = list(Batches(data, cfg, 0).train_batches(0))
    cfg_prefetch = DataConfig(source="embedded", val_size=100, train_size=300, batch_size=64, num_workers=2)
    fetched = list(Batches(data, cfg_prefetch, 0).train_batches(0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(direct, fetched, strict=True))


def test_synthetic_data_has_the_asked_shape() -> None:
    cfg = DataConfig(
        name="synthetic", image_size=12, channels=3, num_classes=5, train_size=64, test_size=16, val_size=8
    )
    data = load_data(cfg, seed=0)
    assert data.train.images.shape == (56, 3, 12, 12) and len(data.test) == 16 and data.num_classes == 5


def test_class_balanced_train_subset_has_equal_classes() -> None:
    cfg = DataConfig(source="embedded", val_size=500, train_size=1003, class_balanced=True)
    data = load_data(cfg, seed=3)
    counts = torch.bincount(data.train.labels, minlength=10).tolist()
    assert counts == [101, 101, 101] + [100] * 7
    assert len(data.val) == 500
    again = load_data(cfg, seed=3)
    assert torch.equal(data.train.labels, again.train.labels)
    other = load_data(cfg, seed=4)
    assert not torch.equal(data.train.images, other.train.images)


@pytest.mark.parametrize("replicas", [2, 3])
def test_replica_shards_partition_every_batch_whatever_the_number_of_replicas(replicas: int) -> None:
    # The union of the shards is the global batch, with the same augmentation as one replica gets;
    # a last batch smaller than the number of replicas is dropped (300 = 4 x 64 + 44, so kept).
    cfg = DataConfig(source="embedded", val_size=100, train_size=300, batch_size=64, augment=True)
    data = load_data(cfg, seed=0)
    whole = list(Batches(data, cfg, seed=0).train_batches(epoch=1))
    shards = [
        list(Batches(data, cfg, 0, shard=(r, replicas)).train_batches(epoch=1)) for r in range(replicas)
    ]
    assert all(len(s) == len(whole) == 5 for s in shards)
    for b, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([s[b][0] for s in shards]), x)
        assert torch.equal(torch.cat([s[b][1] for s in shards]), y)
        sizes = [len(s[b][1]) for s in shards]
        assert max(sizes) - min(sizes) <= 1
    evals = [list(Batches(data, cfg, 0, shard=(r, replicas)).eval_batches("val")) for r in range(replicas)]
    whole_val = list(Batches(data, cfg, 0).eval_batches("val"))
    assert all(len(e) == len(whole_val) for e in evals)
    assert torch.equal(torch.cat([e[0][1] for e in evals]), whole_val[0][1])


def test_a_last_batch_too_small_for_every_replica_is_dropped() -> None:
    assert steps_per_epoch(300, 64, replicas=1) == 5
    assert steps_per_epoch(258, 64, replicas=2) == 5  # 2 left: one each
    assert steps_per_epoch(257, 64, replicas=2) == 4  # 1 left: dropped
    assert shard_bounds(5, 0, 2) == (0, 3) and shard_bounds(5, 1, 2) == (3, 5)
    assert shard_bounds(1, 1, 2) == (1, 1)  # an empty evaluation shard


def test_crop_padding_key_sets_the_shift_range() -> None:
    cfg = DataConfig(source="embedded", val_size=100, train_size=300, batch_size=64, crop_padding=4)
    data = load_data(cfg, seed=0)
    batches = Batches(data, cfg, seed=0)
    assert batches.padding == 4
    assert Batches(data, DataConfig(source="embedded", val_size=100, train_size=300), seed=0).padding == 2
    images = data.train.images[:64]
    out = batches._augment(images, seed=1, n=64, first=0)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    shifts = set()
    for i in range(64):
        for dy in range(9):
            for dx in range(9):
                cand = padded[i, :, dy : dy + 28, dx : dx + 28]
                if torch.equal(out[i], cand) or torch.equal(out[i], cand.flip(-1)):
                    shifts.add(max(abs(dy - 4), abs(dx - 4)))
    assert max(shifts) > 2  # shifts beyond the 28x28 default of 2 occur
