"""Read and write the IDX format of (Fashion-)MNIST, plain or compressed with gzip or xz."""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

_UBYTE = 0x08


class IdxFormatError(ValueError):
    """The bytes are not a valid IDX file."""


def _open(path: Path) -> BinaryIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".xz":
        return lzma.open(path, "rb")
    return open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Return the array stored in an IDX file (only unsigned bytes, which is all MNIST uses)."""
    path = Path(path)
    try:
        with _open(path) as handle:
            data = handle.read()
    except (OSError, EOFError, lzma.LZMAError) as error:
        raise IdxFormatError(f"{path}: cannot read ({error})") from error
    if len(data) < 4:
        raise IdxFormatError(f"{path}: too short to be an IDX file ({len(data)} bytes)")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != _UBYTE or ndim == 0:
        raise IdxFormatError(f"{path}: bad IDX header (expected unsigned bytes)")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    expected = int(np.prod(dims))
    if body.size != expected:
        raise IdxFormatError(f"{path}: expected {expected} bytes of data for shape {dims}, found {body.size}")
    return body.reshape(dims).copy()


def write_idx(handle: BinaryIO, array: np.ndarray) -> None:
    """Write ``array`` (uint8) in IDX format to an open binary handle."""
    if array.dtype != np.uint8:
        raise TypeError(f"IDX writer supports uint8 only, got {array.dtype}")
    handle.write(struct.pack(">HBB", 0, _UBYTE, array.ndim))
    handle.write(struct.pack(f">{array.ndim}I", *array.shape))
    handle.write(np.ascontiguousarray(array).tobytes())
