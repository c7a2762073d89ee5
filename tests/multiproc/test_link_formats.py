"""Both message formats of a gloo link carry every kind of message unchanged (torchrun, 2 ranks).

A host link whose largest activation fits :data:`trgl_pipe.runtime.transport.PACK_LIMIT` sends
header and activation as one message; a larger one sends them apart. The pipelines of the other
tests send activations above the limit (a 100-sample slot of module 0's output is 1.25 MB), so
they cross apart; here the same messages (full and partial training batches with their images,
an empty evaluation shard, markers, STOP) cross the link in both formats, NCHW and
channels_last, and arrive bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from link_exchange import CASES, messages

pytestmark = pytest.mark.multiproc


def test_every_message_crosses_a_gloo_link_unchanged(tmp_path: Path) -> None:
    out = tmp_path / "arrived.pt"
    script = Path(__file__).with_name("link_exchange.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*cmd, str(script), str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(out)
    assert list(results) == CASES
    for (pack, layout), result in results.items():
        assert result["packed"] == (pack == "packed"), (pack, layout)
        sent = messages(layout == "channels_last")
        arrived = result["arrived"]
        assert [a["kind"] for a in arrived] == [int(m.kind) for m in sent], (pack, layout)
        for msg, got in zip(sent, arrived, strict=True):
            case = (pack, layout, msg.kind.name)
            assert got["fields"] == (msg.epoch, msg.batch, msg.step, msg.split, msg.final, msg.preempted), (
                case
            )
            for name in ("x", "y", "image"):
                want = getattr(msg, name)
                if name == "image" and want is not None and want.shape[0] == 0:
                    want = None  # an empty batch sends no image
                assert (want is None) == (got[name] is None), (*case, name)
                if want is not None:
                    assert want.shape == got[name].shape and torch.equal(want, got[name]), (*case, name)
            if msg.x is not None:
                assert got["stride"] == msg.x.stride(), case  # the layout it was computed in, no copy
