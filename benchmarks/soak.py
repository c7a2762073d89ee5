"""Soak: a long pipeline run on a small subset keeps memory flat and buffers bounded.

    python benchmarks/soak.py --k 4 --epochs 30

Every rank logs its peak memory (process peak RSS on CPU, max allocated on GPU) and its current
RSS at each epoch end; the table compares epoch 2 with the last epoch per rank. Checkpoints are
written every epoch and evaluation runs every epoch, so their paths are soaked too.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import run, torchrun_cmd, write_results

MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--buffer", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        overrides = [
            "data.source=embedded",
            "data.val_size=1000",
            f"data.train_size={args.train_size}",
            f"model.num_modules={args.k}",
            f"train.epochs={args.epochs}",
            "train.eval_every_epochs=1",
            "checkpoint.every_epochs=1",
            f"pipeline.buffer_size={args.buffer}",
            "log.live=off",
            "train.num_threads=1",
            f"out_dir={out}",
        ]
        run(torchrun_cmd(args.k, overrides), env={"OMP_NUM_THREADS": "1"})
        events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((out / "summary.json").read_text())
    rows = []
    for k in range(args.k):
        ends = sorted(
            (e for e in events if e["event"] == "epoch_end" and e["module"] == k), key=lambda e: e["epoch"]
        )
        second, last = ends[1], ends[-1]
        rank = summary["ranks"][k]
        rows.append(
            {
                "rank": k,
                "peak_MiB_epoch2": round(second["peak_memory_bytes"] / MIB, 1),
                f"peak_MiB_epoch{last['epoch'] + 1}": round(last["peak_memory_bytes"] / MIB, 1),
                "peak_growth_%": round(
                    100 * (last["peak_memory_bytes"] / second["peak_memory_bytes"] - 1), 2
                ),
                "rss_MiB_epoch2": round(second["rss_bytes"] / MIB, 1),
                f"rss_MiB_epoch{last['epoch'] + 1}": round(last["rss_bytes"] / MIB, 1),
                "rss_growth_%": round(100 * (last["rss_bytes"] / second["rss_bytes"] - 1), 2),
                "max_buffer_occupancy": rank.get("max_buffer_occupancy"),
                "buffer_size": rank.get("buffer_size"),
            }
        )
    notes = [
        f"torchrun, K={args.k} ranks on CPU (gloo), {args.epochs} epochs of {args.train_size} embedded "
        "Fashion-MNIST images, evaluation and a checkpoint every epoch.",
        "peak: process peak RSS (a high-water mark: it grows only if memory does); rss: resident set at "
        "the epoch end. max_buffer_occupancy: the most messages ever in the rank's input buffer "
        "when it took one (at most buffer_size; before 2026-12-08: the next rank's buffer at each send).",
    ]
    write_results(f"soak_k{args.k}", f"Soak: memory over {args.epochs} epochs", rows, notes)


if __name__ == "__main__":
    main()
