"""benchmarks/delayed_cost.py's byte counting: the wire bytes of one message from its shape, and
the storage count of saved tensors (the torchrun runs happen in the benchmark itself)."""

from __future__ import annotations

import sys

import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import delayed_cost


def test_a_message_is_its_payload_and_a_header_with_room_for_max_batch_labels() -> None:
    # 64 samples of 16x14x14 float32; header: 8 int64 counters + 100 int64 label slots
    msg = delayed_cost.link_bytes((16, 14, 14), torch.float32, 64, 100)
    assert msg == {"payload": 802_816, "header": 864, "total": 803_680}
    half = delayed_cost.link_bytes((3, 5), torch.bfloat16, 2, 2)
    assert half == {"payload": 60, "header": 80, "total": 140}


def test_saved_tensors_count_each_storage_once() -> None:
    base = torch.zeros(10, 10)  # 400 bytes
    other = torch.zeros(3, dtype=torch.float64)  # 24 bytes
    assert delayed_cost.storage_bytes([base, base[2:4], base.t(), other]) == 424
    assert delayed_cost.storage_bytes([]) == 0
