"""python -m trgl_pipe.search CONFIG [key=value ...] [--budget N] [--out search.yaml] [--resume]"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from trgl_pipe.errors import UserError
from trgl_pipe.search.loop import SearchOptions, run_search
from trgl_pipe.search.result import Decision


def _parser() -> argparse.ArgumentParser:
    defaults = SearchOptions()
    parser = argparse.ArgumentParser(
        prog="python -m trgl_pipe.search",
        description="SEDONA's search (Pyeon et al., 2021): where to cut the config's network into "
        "model.num_modules modules and how deep each module's SEDONA head should be.",
        epilog="Writes OUT (model.split, aux.type=sedona, aux.depth: pass it to a run after the config, "
        "python -m trgl_pipe.run CONFIG OUT) and OUT's .json (scores, options, cost).",
    )
    parser.add_argument("config", nargs="?", help="YAML config file (defaults apply without one)")
    parser.add_argument("overrides", nargs="*", help="section.key=value or an override .yaml")
    parser.add_argument(
        "--out", default="search.yaml", help="the override file to write (default search.yaml)"
    )
    parser.add_argument(
        "--budget", type=int, default=defaults.budget, help="meta-steps (default %(default)s)"
    )
    parser.add_argument(
        "--inner-steps", type=int, default=defaults.inner_steps, help="unrolled steps per meta-gradient"
    )
    parser.add_argument(
        "--objective",
        choices=("valid", "train"),
        default=defaults.objective,
        help="valid: the paper's held-out loss after the unrolled steps (default); train: the authors' "
        "code's, the relaxed training loss of the last unrolled step",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="the search's batch (default: data.batch_size)"
    )
    parser.add_argument("--valid-fraction", type=float, default=defaults.valid_fraction)
    parser.add_argument("--max-depth", type=int, default=defaults.max_depth, help="head depths 1..N")
    parser.add_argument("--meta-lr", type=float, default=defaults.meta_lr)
    parser.add_argument("--smoothing", type=float, default=defaults.smoothing)
    parser.add_argument("--save-every", type=int, default=defaults.save_every)
    parser.add_argument(
        "--memory",
        type=int,
        default=defaults.memory,
        help="SEDONA's weight memory: snapshots of a warm-up each meta-step starts from (default 0: none)",
    )
    parser.add_argument(
        "--warmup", type=int, default=defaults.warmup, help="steps of the warm-up the memory is taken from"
    )
    parser.add_argument("--resume", action="store_true", help="go on from the saved state of OUT's search")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    from trgl_pipe.config import load_config

    options = SearchOptions(
        args.budget,
        args.inner_steps,
        args.objective,
        args.valid_fraction,
        args.max_depth,
        args.meta_lr,
        smoothing=args.smoothing,
        save_every=args.save_every,
        memory=args.memory,
        warmup=args.warmup,
    )
    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path:  # no config file, only overrides
        config_path, overrides = None, [config_path, *overrides]
    out = Path(args.out)
    command = "python -m trgl_pipe.search " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        options.check()
        if args.batch_size is not None:
            overrides.append(f"data.batch_size={args.batch_size}")  # checked as the key is
        cfg = load_config(config_path, overrides)
        header = [
            "SEDONA's search (trgl_pipe.search); pass this file after the config: it sets the keys below",
            command,
        ]
        with _progress(options.budget) as report:
            decision = run_search(cfg, options, out, header, args.resume, report=report)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return error.exit_code
    except KeyboardInterrupt:
        print(
            f"interrupted: {out.with_suffix('.state.pt')} holds the last saved step (every "
            f"{options.save_every}); add --resume to go on",
            file=sys.stderr,
            flush=True,
        )
        return 130
    assert decision is not None
    print(
        f"split {decision.split}, head depths {decision.depths[:-1]}: "
        f"wrote {out} and {out.with_suffix('.json')}"
    )
    return 0


@contextmanager
def _progress(budget: int) -> Iterator[Callable[[int, float, Decision], None]]:
    """A progress bar on a terminal (taken down however the search ends), else a line every 5%
    of the budget."""
    if sys.stdout.isatty():
        from rich.progress import Progress

        with Progress() as bar:
            task = bar.add_task("search", total=budget)

            def show(step: int, value: float, decision: Decision) -> None:
                bar.update(task, completed=step, description=f"J {value:.3f} split {decision.split}")

            yield show
        return
    every = max(1, budget // 20)

    def line(step: int, value: float, decision: Decision) -> None:
        if step % every == 0 or step == budget:
            print(
                f"step {step}/{budget}: meta-objective {value:.4f}, split {decision.split}, "
                f"depths {decision.depths[:-1]}",
                flush=True,
            )

    yield line


if __name__ == "__main__":
    sys.exit(main())
