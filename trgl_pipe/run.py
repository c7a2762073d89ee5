"""Train a network module-wise with TRGL.

One process (any regime, CPU or one GPU):
    python -m trgl_pipe.run configs/quickstart.yaml [section.key=value ...]

Pipeline, one module per rank (train.regime=parallel; K = model.num_modules):
    torchrun --nproc_per_node=K -m trgl_pipe.run configs/quickstart.yaml

Pipeline across 2 nodes (K = 2 * ranks per node), run on each node:
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29500 --rdzv-id=JOB -m trgl_pipe.run CONFIG.yaml

Pipeline simulated in one process, one thread per module:
    python -m trgl_pipe.run CONFIG.yaml pipeline.transport=sim
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from trgl_pipe.config import load_config
from trgl_pipe.errors import UnusedKeyWarning, UserCodeError, UserError
from trgl_pipe.folder.run_folder import finished_already
from trgl_pipe.launch import record_failure
from trgl_pipe.runtime import preemption
from trgl_pipe.watch.sinks import check_packages


def _launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _one_line_warnings(rank: int) -> None:
    """A deprecated key is one line on the console, said once (by rank 0 under torchrun)."""
    warnings.formatwarning = lambda message, category, *_a, **_k: f"{category.__name__}: {message}\n"
    if rank != 0:
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UnusedKeyWarning)


def main(argv: list[str] | None = None) -> int:
    from trgl_pipe.describe import describe_run, keys_help

    parser = argparse.ArgumentParser(
        prog="python -m trgl_pipe.run",
        description="Module-wise training with TRGL.",
        epilog="Overrides look like train.epochs=5 or model.split=[3,6,9].\n\n" + keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", help="YAML config file (defaults apply without one)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config, the layout and the launch line, then exit without training",
    )
    args = parser.parse_args(argv)
    config_path = args.config
    overrides = list(args.overrides)
    if config_path is not None and "=" in config_path and not config_path.endswith((".yaml", ".yml")):
        overrides.insert(0, config_path)
        config_path = None
    rank = int(os.environ.get("RANK", "0"))
    _one_line_warnings(rank)
    try:
        cfg = load_config(config_path, overrides)
        if args.print_config:
            if rank == 0:
                print(describe_run(cfg, config_path, overrides), flush=True)
            return 0
        finished = finished_already(cfg)  # every rank reads it: all of them stop here, none writes
        if finished is not None:
            if rank == 0:
                print(finished, flush=True)
            return 0
        check_packages(cfg)  # TensorBoard / W&B asked for but not installed: say so before any work
        if _launched_world_size() > 1 or cfg.pipeline.transport == "dist":
            from trgl_pipe.training.rank import run_rank

            run_rank(cfg)
        else:
            from trgl_pipe.training.single import run_single

            run_single(cfg)
    except UserError as error:
        # every rank finds the same bad input: rank 0 says it (or the launcher, from the error file)
        if not record_failure(f"error: {error}", error.exit_code) and rank == 0:
            if isinstance(error, UserCodeError):  # the user's frames, then the one line, last
                print(error.user_frames, end="", file=sys.stderr, flush=True)
            print(f"error: {error}", file=sys.stderr, flush=True)
        return error.exit_code
    except Exception as error:
        # failures with an exit code (a failed pipeline, a non-finite loss, SIGTERM) get one line
        code = getattr(error, "exit_code", None)
        if code is None:
            raise
        word = "stopped" if code == preemption.EXIT_CODE else "error"
        print(f"{word}: {error}", file=sys.stderr, flush=True)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
