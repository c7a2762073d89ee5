"""One link between two gloo ranks (run under torchrun): rank 0 sends a fixed list of messages,
rank 1 receives them and writes what arrived to ``OUT`` as a torch file, for the test to compare.

The same messages cross the link once per :data:`CASES`: with
:data:`trgl_pipe.runtime.transport.PACK_LIMIT` at its value (header and activation in one gloo
message) and at 0 (header, activation and image apart), in NCHW and channels_last.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from trgl_pipe.runtime import transport
from trgl_pipe.runtime.buffer import LocalControl, Waiter
from trgl_pipe.runtime.messages import Kind, Message

MAX_BATCH = 8
SAMPLE = (3, 4, 5)
IMAGE = (1, 6, 6)
CASES = [(pack, layout) for pack in ("packed", "apart") for layout in ("nchw", "channels_last")]


def messages(channels_last: bool) -> list[Message]:
    """A full and a partial training batch (with their images), an empty evaluation shard, a
    marker and the STOP; the activations in the layout both ends agreed on."""
    g = torch.Generator().manual_seed(0)

    def batch(n: int) -> torch.Tensor:
        x = torch.randn(n, *SAMPLE, generator=g)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def labels(n: int) -> torch.Tensor:
        return torch.randint(0, 10, (n,), generator=g)

    def train(n: int, index: int) -> Message:
        image = torch.randn(n, *IMAGE, generator=g)
        return Message(Kind.TRAIN, batch(n), labels(n), epoch=0, batch=index, step=index + 1, image=image)

    return [
        train(8, 0),
        train(3, 1),
        Message(Kind.EVAL, batch(0), labels(0), epoch=0, split=1),
        Message(Kind.EVAL, batch(5), labels(5), epoch=0, split=2),
        Message(Kind.EVAL_DONE, epoch=0, final=True),
        Message(Kind.STOP, preempted=True),
    ]


def main(out: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    limit = transport.PACK_LIMIT
    results = {}
    for pack, layout in CASES:
        transport.PACK_LIMIT = limit if pack == "packed" else 0
        results[pack, layout] = exchange(dist.get_rank(), layout == "channels_last")
        dist.barrier()
    if dist.get_rank() == 1:
        torch.save(results, out)
    dist.destroy_process_group()


def exchange(rank: int, channels_last: bool) -> dict | None:
    """The messages through a new link; on rank 1, what arrived and whether the link packed."""
    link = transport.LinkSettings(dist.group.WORLD, 2, MAX_BATCH, torch.device("cpu"), 60)
    waiter = Waiter(LocalControl(), 60, f"rank {rank}")
    if rank == 0:
        outbox = transport.DistOutbox(0, 1, link)
        outbox.handshake(SAMPLE, torch.float32, channels_last)
        for msg in messages(channels_last):
            outbox.send(msg, waiter)
        outbox.close(waiter)
        return None
    inbox = transport.DistInbox(1, 0, link, image_shape=IMAGE)
    inbox.handshake()
    arrived = []
    while True:
        msg = inbox.recv(waiter)
        arrived.append(
            {
                "kind": int(msg.kind),
                "fields": (msg.epoch, msg.batch, msg.step, msg.split, msg.final, msg.preempted),
                "x": None if msg.x is None else msg.x.clone(),
                "stride": None if msg.x is None else msg.x.stride(),
                "y": msg.y,
                "image": msg.image,
            }
        )
        inbox.release(msg)
        if msg.kind is Kind.STOP:
            break
    inbox.close(waiter)
    return {"arrived": arrived, "packed": inbox._packs}


if __name__ == "__main__":
    main(sys.argv[1])
