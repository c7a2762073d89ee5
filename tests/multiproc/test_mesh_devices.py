"""Process groups of ranks with and without a GPU: every rank creates the same groups.

torch's ``init_device_mesh`` creates a group for a mesh dimension that spans the world only where
``torch.cuda.is_available()`` is true, so a GPU rank waits in ``new_group`` for CPU ranks that never
call it. Two gloo ranks reproduce that on any machine: rank 0 is told it has a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, free_port

pytestmark = pytest.mark.multiproc

SCRIPT = """
import os, sys
from datetime import timedelta
import torch
import torch.distributed as dist
rank = int(os.environ["RANK"])
if rank == 0:
    torch.cuda.is_available = lambda: True  # this rank has a GPU, the other has none
from trgl_pipe.runtime.layout import Layout
from trgl_pipe.runtime.mesh import create_mesh
dist.init_process_group("gloo", timeout=timedelta(seconds=15))
layout = Layout(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
limit = timedelta(seconds=15)
mesh, pp, dp = create_mesh(layout, rank, "cpu", limit, limit)
sums = []
for group in (pp, dp):
    t = torch.ones(1)
    dist.all_reduce(t, group=group)
    sums.append(int(t))
assert mesh.get_group("pp") is pp and mesh.get_group("dp") is dp
print("sizes", rank, *sums, flush=True)
dist.destroy_process_group()
"""


@pytest.mark.parametrize(
    ("layout", "sizes"),
    [((2, 1, 1), (2, 1)), ((2, 2, 2), (1, 2))],
    ids=["pp-spans-the-world", "dp-spans-the-world"],
)
def test_a_rank_with_a_gpu_and_one_without_create_the_same_groups(layout, sizes) -> None:
    port = free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", SCRIPT, *map(str, layout)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("the ranks hung creating their groups")
        assert proc.returncode == 0, err[-2000:]
        outputs.append(out.split())
    assert [o[-3:] for o in outputs] == [[str(r), *map(str, sizes)] for r in range(2)]
