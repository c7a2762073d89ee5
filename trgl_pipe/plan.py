"""Plan a pipeline layout: which (modules per rank M, replicas R) to run a config on N devices.

    python -m trgl_pipe.plan CONFIG.yaml --gpus 8 [--gpu-memory 80] [--link-gbps 100] [key=value ...]
    python -m trgl_pipe.plan CONFIG.yaml --gpus 4 --search search.yaml   # searched, depth, balanced

Measures, on this machine, each module's training step (its blocks and its head, forward and
backward) at every per-replica batch size a layout would use, and each module's memory (on the
meta device where there is no GPU: weights, gradients and momentum, plus the activations kept for
backward), and the rate of the data input. Then lists the layouts that fit the devices' memory,
fastest first, with the torchrun and Slurm lines that start them.

The projection's model (stated with its inputs in the output):
- a stage (M consecutive modules on one rank) takes the sum of its modules' step times, measured
  at the per-replica batch B/R;
- with R > 1 each step adds a ring all-reduce of the stage's parameter bytes P over the link:
  2 (R − 1) / R · P / bandwidth (gradients, fp32);
- each step, every replica of a stage sends its shard's activations to the next stage over the
  link: (B/R) × the features of one output sample × 4 bytes (2 with ``pipeline.wire_dtype``) /
  bandwidth; sends overlap computing (the runtime sends without blocking and receives ahead), so
  a link slows the pipeline only where it takes longer than the slowest stage;
- the pipeline runs at the rate of its slowest stage or link, B / max(stage time, link time), and
  no faster than the first stage's R replicas can read data (R × the measured per-replica reader
  rate);
- a rank's peak memory is the weights, gradients and momentum of its modules, the largest
  activation set of one of its modules (each frees its graph after its step) at batch B/R, and
  the receive slots and in-flight outputs of ``pipeline.buffer_size`` messages, each of the larger
  of the training and evaluation batches per replica (what the run allocates:
  :func:`trgl_pipe.runtime.layout.slot_samples`).
What it leaves out: overlap of the all-reduce with compute, the CPU time a send costs the ranks
(gloo), the image InfoPro's modules read (it travels with the activations), the link's latency,
contention between ranks that share a machine's memory bandwidth, GPU kernel efficiency at small
batches beyond what was measured here. benchmarks/link_speed.py checks the link term against
pipelines whose link is capped.

With ``--search`` (a search.yaml of ``python -m trgl_pipe.search``) it puts the searched split and
heads beside the config's heads on the depth and the balanced split (``model.balance_by``), each
with its fastest layout on the devices and the search's cut weight at its cuts: how much speed
the search's choice gives up, or gains, against the splits chosen by cost alone.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from trgl_pipe.config import Config, load_config
from trgl_pipe.context import resolve_partition
from trgl_pipe.cost import median_time, saved_bytes
from trgl_pipe.errors import UserError
from trgl_pipe.runtime.layout import slot_samples
from trgl_pipe.stage import ModuleBody, StagePlan, build_head, build_parts

GIB = 2**30
SHAPES = {
    "fashion_mnist": (1, 28),
    "mnist": (1, 28),
    "cifar10": (3, 32),
    "cifar100": (3, 32),
    "stl10": (3, 96),
    "tiny_imagenet": (3, 64),
}
CLASSES = {"cifar100": 100, "tiny_imagenet": 200}


@dataclass
class ModuleProfile:
    time_s: dict[int, float]  # per-replica batch size -> seconds of one training step
    activation_bytes: dict[int, int]  # per-replica batch size -> bytes kept for backward
    param_bytes: int  # weights of body and head
    input_features: int  # elements of one input sample (receive slots)
    output_features: int


@dataclass
class Layout:
    modules_per_rank: int
    replicas: int
    stages: list[list[int]]  # module indices of each stage
    samples_per_s: float
    stage_time_s: list[float]
    allreduce_s: list[float]
    reader_limited: bool
    peak_bytes: int
    link_s: list[float] = field(default_factory=list)  # per boundary: one step's sends

    @property
    def link_limited(self) -> bool:
        """The slowest part is a link between stages, not a stage."""
        return bool(self.link_s) and max(self.link_s) > max(self.stage_time_s)

    @property
    def world_size(self) -> int:
        return len(self.stages) * self.replicas


def data_shape(cfg: Config) -> tuple[tuple[int, int, int], int]:
    if cfg.data.is_user:  # a user dataset: its shapes and classes are known once it is read
        from trgl_pipe.data import load_data

        data = load_data(cfg.data, cfg.seed)
        return (data.channels, data.image_size, data.image_size), data.num_classes
    if cfg.data.name in ("synthetic", "image_folder"):
        return (cfg.data.channels, cfg.data.image_size, cfg.data.image_size), cfg.data.num_classes
    channels, size = SHAPES[cfg.data.name]
    return (channels, size, size), CLASSES.get(cfg.data.name, 10)


def profile_modules(
    cfg: Config, batches: list[int], device: torch.device, repeats: int = 3
) -> list[ModuleProfile]:
    """Each module's step time at each batch size (on ``device``) and its memory (meta device)."""
    input_shape, classes = data_shape(cfg)
    parts = build_parts(cfg, input_shape, classes)
    partition = (
        resolve_partition(cfg, parts, None, classes, device) if cfg.model.split != "balanced" else None
    )
    if partition is None:
        raise UserError("python -m trgl_pipe.plan needs model.split=depth, preset or explicit block indices")
    profiles = []
    for k, (a, b) in enumerate(partition):
        plan = StagePlan(k, len(partition), a, b)
        body = ModuleBody(parts.stem if k == 0 else None, parts.blocks[a:b], a, cfg.trgl.reduction)
        head = build_head(parts, plan, classes, cfg)
        in_shape = input_shape if k == 0 else parts.input_of(a)
        out_shape = parts.shapes[b - 1]

        def step(batch: int, body=body, head=head, in_shape=in_shape, dev=device) -> None:
            x = torch.randn(batch, *in_shape, device=dev)
            y = torch.randint(0, classes, (batch,), device=dev)
            out, kinetic = body(x, kinetic_grad=cfg.trgl.enabled)
            loss = F.cross_entropy(head(out), y) + kinetic * 1e-6
            loss.backward()

        here = (copy.deepcopy(body).to(device), copy.deepcopy(head).to(device))
        meta = (copy.deepcopy(body).to("meta"), copy.deepcopy(head).to("meta"))
        times = {n: median_time(lambda n=n, m=here: step(n, *m), device, repeats) for n in batches}
        activations = {
            n: saved_bytes(lambda n=n, m=meta: step(n, *m, dev=torch.device("meta"))) for n in batches
        }
        params = sum(p.numel() * p.element_size() for m in (body, head) for p in m.parameters())
        profiles.append(ModuleProfile(times, activations, params, math.prod(in_shape), math.prod(out_shape)))
    return profiles


def reader_rate(cfg: Config, seconds: float = 2.0) -> float | None:
    """Training samples per second one replica's data input produces here (None: no data here)."""
    from trgl_pipe.data import Batches, load_data

    try:
        data = load_data(cfg.data, cfg.seed)
    except UserError:
        return None
    batches = Batches(data, cfg.data, cfg.seed)
    n, t0 = 0, time.perf_counter()
    for epoch in range(1000):
        for _, y in batches.train_batches(epoch):
            n += len(y)
            if time.perf_counter() - t0 > seconds:
                return n / (time.perf_counter() - t0)
    return n / (time.perf_counter() - t0)


def wire_bytes(cfg: Config) -> int:
    """Bytes per activation value on the link between stages."""
    return 2 if cfg.pipeline.wire_dtype is not None else 4


def project(
    profiles: list[ModuleProfile],
    m: int,
    r: int,
    batch: int,
    link_gbps: float,
    reader: float | None,
    buffers: int,
    eval_batch: int | None = None,
    wire_bytes: int = 4,
) -> Layout:
    """The layout with M modules per rank and R replicas, under the model in the module docstring
    (``wire_bytes``: bytes per activation value on the link)."""
    k = len(profiles)
    stages = [list(range(s, s + m)) for s in range(0, k, m)]
    local = -(-batch // r)  # the largest shard
    # receive slots and outputs in flight hold the largest message: the run allocates them so
    slot = slot_samples(batch, batch if eval_batch is None else eval_batch, r)
    times, allreduce, peaks = [], [], []
    for stage in stages:
        step = sum(profiles[i].time_s[local] for i in stage)
        params = sum(profiles[i].param_bytes for i in stage)
        comm = 2 * (r - 1) / r * params / (link_gbps * 1e9 / 8) if r > 1 else 0.0
        times.append(step + comm)
        allreduce.append(comm)
        first, last = profiles[stage[0]], profiles[stage[-1]]
        slots = buffers * slot * (first.input_features + last.output_features) * 4
        peaks.append(3 * params + max(profiles[i].activation_bytes[local] for i in stage) + slots)
    bytes_per_s = link_gbps * 1e9 / 8
    links = [local * profiles[stage[-1]].output_features * wire_bytes / bytes_per_s for stage in stages[:-1]]
    rate = batch / max([*times, *links])
    limited = reader is not None and r * reader < rate
    if limited:
        rate = r * reader
    return Layout(m, r, stages, rate, times, allreduce, limited, max(peaks), links)


def layouts(
    profiles: list[ModuleProfile],
    devices: int,
    batch: int,
    memory_gib: float | None,
    link_gbps: float,
    reader: float | None,
    buffers: int,
    eval_batch: int | None = None,
    wire_bytes: int = 4,
) -> list[Layout]:
    k = len(profiles)
    found = []
    for m in (d for d in range(1, k + 1) if k % d == 0):
        for r in range(1, devices + 1):
            if (k // m) * r > devices or batch < r:
                continue
            layout = project(profiles, m, r, batch, link_gbps, reader, buffers, eval_batch, wire_bytes)
            if memory_gib is None or layout.peak_bytes <= memory_gib * GIB:
                found.append(layout)
    return sorted(found, key=lambda lay: (-lay.samples_per_s, lay.world_size))


def layouts_for(
    profiles: list[ModuleProfile], args: argparse.Namespace, cfg: Config, reader: float | None
) -> list[Layout]:
    """:func:`layouts` for the command's devices and the config's batch, buffers and wire."""
    return layouts(
        profiles,
        args.gpus,
        cfg.data.batch_size,
        args.gpu_memory,
        args.link_gbps,
        reader,
        cfg.pipeline.buffer_size,
        cfg.data.eval_batch_size,
        wire_bytes(cfg),
    )


def launch_lines(config: str, layout: Layout, gpus_per_node: int) -> tuple[str, str]:
    world = layout.world_size
    keys = f"pipeline.modules_per_rank={layout.modules_per_rank} pipeline.replicas={layout.replicas}"
    nodes = max(1, math.ceil(world / gpus_per_node))
    per_node = world // nodes if world % nodes == 0 else world
    if world == 1:  # one rank: the single-process parallel regime
        one = f"python -m trgl_pipe.run {config}"
        return one, f"sbatch --nodes=1 --gpus-per-node=1 --wrap '{one}'"
    if nodes == 1:
        torchrun = f"torchrun --nproc_per_node={world} -m trgl_pipe.run {config} {keys}"
    else:
        torchrun = (
            f"torchrun --nnodes={nodes} --nproc_per_node={per_node} --rdzv-backend=c10d "
            f"--rdzv-endpoint=HEAD:29500 --rdzv-id=JOB -m trgl_pipe.run {config} {keys}"
        )
    slurm = f"sbatch --nodes={nodes} --gpus-per-node={per_node} launch/slurm.sbatch {config} {keys}"
    return torchrun, slurm


def _check_arguments(args: argparse.Namespace) -> None:
    """One line for an invalid argument (rather than a search that finds no layout)."""
    for name in ("gpus", "gpus_per_node", "threads", "top"):
        if getattr(args, name) < 1:
            raise UserError(
                f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: it must be at least 1"
            )
    for name in ("gpu_memory", "link_gbps"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UserError(f"--{name.replace('_', '-')} {value:g} is invalid: it must be greater than 0")
    if args.device not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device} is invalid: use cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA GPU here; time the modules with --device cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trgl_pipe.plan", description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--gpus", type=int, required=True, help="devices to place the ranks on")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory", type=float, default=None, help="GiB per device (default: no limit)")
    parser.add_argument(
        "--link-gbps",
        type=float,
        default=100.0,
        help="bandwidth between ranks (activations, all-reduce), Gbit/s",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads per device when timing on the CPU"
    )
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument(
        "--search", default=None, help="a search.yaml: compare its split with the depth and balanced splits"
    )
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options, as the help shows
    try:
        _check_arguments(args)
        cfg = load_config(args.config, args.overrides)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.search is not None:
        try:
            return compare_splits(args, cfg, device)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return error.exit_code
    batch = cfg.data.batch_size
    replicas = [r for r in range(1, args.gpus + 1) if r <= batch]
    sizes = sorted({-(-batch // r) for r in replicas})
    print(
        f"measuring {cfg.model.num_modules} modules of a {cfg.model.name} at batch sizes {sizes} on {device}"
    )
    try:
        profiles = profile_modules(cfg, sizes, device)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    reader = reader_rate(cfg)
    found = layouts_for(profiles, args, cfg, reader)
    print(
        f"model: stage time = sum of its modules' step times at batch {batch}/R (measured on {device}"
        f"{f', {args.threads} thread' if device.type == 'cpu' else ''}), + ring all-reduce of its parameters "
        f"over {args.link_gbps:g} Gbit/s; each link between stages carries {batch}/R activations of "
        f"{wire_bytes(cfg)} bytes per value per step, overlapped with computing; "
        f"rate = {batch} / slowest stage or link, capped by R x data input "
        f"({'not measured: no data here' if reader is None else f'{reader:.0f} samples/s per replica'}); "
        f"memory: weights x3 + the largest module's activations + {cfg.pipeline.buffer_size} receive slots "
        f"and outputs in flight of {slot_samples(batch, cfg.data.eval_batch_size)} samples "
        "(the larger of data.batch_size and data.eval_batch_size, per replica)"
    )
    if not found:
        print(
            f"error: no layout of {cfg.model.num_modules} modules fits {args.gpus} devices"
            + (f" of {args.gpu_memory:g} GiB" if args.gpu_memory else "")
            + "; use more devices (--gpus), devices with more memory (--gpu-memory) or a smaller "
            "data.batch_size",
            file=sys.stderr,
        )
        return 1
    header = f"{'M':>3} {'R':>3} {'ranks':>5} {'stages (modules)':<24} {'samples/s':>10} {'peak GiB':>9}"
    print(f"{header}  bottleneck")
    for layout in found[: args.top]:
        slowest = max(range(len(layout.stages)), key=lambda s: layout.stage_time_s[s])
        why = "data input" if layout.reader_limited else f"stage {slowest}"
        if layout.link_limited and not layout.reader_limited:
            boundary = max(range(len(layout.link_s)), key=lambda b: layout.link_s[b])
            why = f"link {boundary}-{boundary + 1}"
        elif layout.allreduce_s[slowest] > 0.5 * layout.stage_time_s[slowest]:
            why += " (all-reduce)"
        stages = ",".join(f"{s[0]}-{s[-1]}" if len(s) > 1 else f"{s[0]}" for s in layout.stages)
        print(
            f"{layout.modules_per_rank:>3} {layout.replicas:>3} {layout.world_size:>5} {stages:<24} "
            f"{layout.samples_per_s:>10.0f} {layout.peak_bytes / GIB:>9.2f}  {why}"
        )
        torchrun, slurm = launch_lines(args.config, layout, args.gpus_per_node)
        print(f"      {torchrun}\n      {slurm}")
    return 0


def balanced_cuts(cfg: Config, device: torch.device) -> list[int]:
    """The blocks where modules 2..K start under ``model.split=balanced`` (measured here)."""
    from trgl_pipe.cost import aux_head_factory, measure_costs
    from trgl_pipe.partition import split_balanced

    input_shape, classes = data_shape(cfg)
    parts = build_parts(cfg, input_shape, classes)
    heads = aux_head_factory(parts, classes, cfg)
    costs, ends = measure_costs(
        parts, input_shape, cfg.data.batch_size, classes, heads, cfg.model.balance_by, device
    )
    return [a for a, _ in split_balanced(costs, cfg.model.num_modules, ends)][1:]


def compare_splits(args: argparse.Namespace, cfg: Config, device: torch.device) -> int:
    """The searched split beside the depth and balanced splits: each one's fastest layout."""
    from trgl_pipe.search.result import read_record, read_split

    searched = read_split(args.search)
    record = read_record(args.search)
    cut_scores = record["decision"]["cut_scores"]
    base = [*args.overrides]
    k = searched["model"].get("num_modules", cfg.model.num_modules)
    depth = load_config(args.config, [*base, f"model.num_modules={k}", "model.split=depth"])
    balanced = balanced_cuts(load_config(args.config, [*base, f"model.num_modules={k}"]), device)
    rows = [
        ("searched", load_config(args.config, [*base, args.search])),
        ("depth", depth),
        ("balanced", load_config(args.config, [*base, f"model.num_modules={k}", f"model.split={balanced}"])),
    ]
    batch = cfg.data.batch_size
    sizes = sorted({-(-batch // r) for r in range(1, args.gpus + 1) if r <= batch})
    reader = reader_rate(cfg)
    print(
        f"the search's split ({args.search}) beside the depth and balanced splits of K = {k}, each with its "
        f"fastest layout on {args.gpus} devices (times measured on {device}; model as without --search); "
        "cut weight: the search's mean a_cut at the split's cuts (its preference, not an accuracy)"
    )
    print(
        f"{'split':<9} {'cuts':<18} {'heads':<22} {'M':>2} {'R':>2} {'samples/s':>10} {'peak GiB':>9} "
        f"{'cut weight':>11}"
    )
    for name, row in rows:
        shape, classes = data_shape(row)
        partition = resolve_partition(row, build_parts(row, shape, classes), None, classes, device)
        cuts = [a for a, _ in partition][1:]
        profiles = profile_modules(row, sizes, device)
        found = layouts_for(profiles, args, row, reader)
        heads = row.aux.type + (f" {row.aux.depth}" if row.aux.type == "sedona" else "")
        weight = sum(cut_scores[c - 1] for c in cuts) / len(cuts) if cuts else float("nan")
        if not found:
            print(f"{name:<9} {cuts!s:<18} {heads:<22} no layout fits {args.gpus} devices")
            continue
        best = found[0]
        print(
            f"{name:<9} {cuts!s:<18} {heads:<22} {best.modules_per_rank:>2} {best.replicas:>2} "
            f"{best.samples_per_s:>10.0f} {best.peak_bytes / GIB:>9.2f} {weight:>11.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
