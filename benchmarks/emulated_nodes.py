"""Two emulated nodes on one machine: a network namespace each, joined by a veth pair.

Each node has its own interfaces, addresses and ports, so every byte between the two crosses the
veth link, which ``tc``'s token bucket filter can cap to a rate (the kernel here has no netem, so
no added delay). Needs root and iproute2. Used by tests/multiproc/test_layouts.py (the README's
two-node launch) and benchmarks/link_speed.py (the pipeline at the speed of its link).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Node:
    prefix: list[str]  # the command prefix that runs a program inside the node's namespace
    address: str
    link: str  # the node's end of the veth pair


def why_not() -> str | None:
    """Why this machine cannot make the nodes, or None when it can."""
    if os.geteuid() != 0:
        return "two emulated nodes need root (ip netns); this process is not root"
    if shutil.which("ip") is None:
        return "two emulated nodes need iproute2's ip; it is not installed"
    return None


def _run(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, timeout=30)


def cap(nodes: list[Node], rate_bits: float | None) -> None:
    """Cap both directions of the link to ``rate_bits`` per second (None: uncapped).

    A token bucket on each end: bucket depth 10 ms of the rate (at least 64 KiB, the largest
    burst TCP segmentation offload hands the device), a queue of up to 100 ms of the rate."""
    for node in nodes:
        subprocess.run(
            [*node.prefix, "tc", "qdisc", "del", "dev", node.link, "root"], capture_output=True, timeout=30
        )
        if rate_bits is not None:
            burst = max(64 * 1024, int(rate_bits / 8 / 100))
            _run(
                *node.prefix,
                "tc",
                "qdisc",
                "add",
                "dev",
                node.link,
                "root",
                "tbf",
                "rate",
                f"{int(rate_bits)}bit",
                "burst",
                str(burst),
                "latency",
                "100ms",
            )


@contextmanager
def two_nodes(rate_bits: float | None = None) -> Iterator[list[Node]]:
    """Make the two nodes (the link capped at ``rate_bits``), yield them, remove them."""
    reason = why_not()
    if reason is not None:
        raise RuntimeError(reason)
    tag = f"tp{os.getpid() % 100000}"
    subnet = f"10.{77 + os.getpid() % 100}.{os.getpid() % 250}"
    names = [(f"{tag}a", f"{tag}va", f"{subnet}.1"), (f"{tag}b", f"{tag}vb", f"{subnet}.2")]
    try:
        for name, _, _ in names:
            _run("ip", "netns", "add", name)
        _run("ip", "link", "add", names[0][1], "type", "veth", "peer", "name", names[1][1])
        for name, link, address in names:
            _run("ip", "link", "set", link, "netns", name)
            _run("ip", "-n", name, "addr", "add", f"{address}/24", "dev", link)
            _run("ip", "-n", name, "link", "set", link, "up")
            _run("ip", "-n", name, "link", "set", "lo", "up")
        nodes = [Node(["ip", "netns", "exec", name], address, link) for name, link, address in names]
        cap(nodes, rate_bits)
        yield nodes
    finally:
        for name, _, _ in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def torchrun_on_nodes(
    nodes: list[Node], nproc_per_node: int, target: list[str], port: int = 29400, run_id: str = "two-nodes"
) -> list[tuple[list[str], dict[str, str]]]:
    """The command and environment of each node's torchrun agent: c10d rendezvous on the first
    node's address (``is_host``: torchrun cannot tell that an address inside a namespace is its
    own), each agent's own ``--local-addr``, gloo bound to the node's link (GLOO_SOCKET_IFNAME)."""
    import sys

    launches = []
    for index, node in enumerate(nodes):
        command = [
            *node.prefix,
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={len(nodes)}",
            f"--nproc_per_node={nproc_per_node}",
            f"--node-rank={index}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={nodes[0].address}:{port}",
            f"--rdzv-conf=is_host={str(index == 0).lower()}",
            f"--local-addr={node.address}",
            f"--rdzv-id={run_id}",
            "--monitor-interval=0.2",
            *target,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": node.link}
        launches.append((command, env))
    return launches


def run_agents(
    launches: list[tuple[list[str], dict[str, str]]], cwd: Path, timeout: float
) -> list[tuple[int, str]]:
    """Start every node's agent, wait for all of them (killing any left at the timeout); each
    one's exit code and standard error."""
    pipe = subprocess.PIPE
    agents = [
        subprocess.Popen(cmd, cwd=cwd, env=env, stdout=pipe, stderr=pipe, text=True) for cmd, env in launches
    ]
    try:
        outputs = [agent.communicate(timeout=timeout) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    return [(agent.returncode, err) for agent, (_, err) in zip(agents, outputs, strict=True)]
