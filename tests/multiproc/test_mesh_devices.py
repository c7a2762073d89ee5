"""Process groups of ranks with and without a GPU: every rank creates the same groups.

torch's ``init_device_mesh`` creates a group for a mesh dimension that spans the world only where
``torch.cuda.is_available()`` is true, so a GPU rank waits in ``new_group`` for CPU ranks that never
call it. Two gloo ranks reproduce that on any machine: rank 0 is told it has a GPU.
"""

from __future__ import annotations

import pytest
from conftest import run_ranks

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
    outputs = run_ranks(SCRIPT, 2, [str(v) for v in layout])
    assert [o.split()[-3:] for o in outputs] == [[str(r), *map(str, sizes)] for r in range(2)]
