"""A stage: one module T_k with its classifier F_k, optimizer, LR schedule and objective state.

``train_step(x, y)`` runs forward, local loss, backward and optimizer step, and returns the
module's output *detached*, so no gradient ever crosses to the module before it. A stage knows
nothing about how its input arrives or where its output goes (see runtime and transport).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trgl_pipe.config import Config
from trgl_pipe.errors import ConfigError, NonFiniteLossError
from trgl_pipe.models import AuxHead, Backbone, TokenHead, VectorHead, build_backbone, kinetic_energy
from trgl_pipe.models.determinism import Finding, audit
from trgl_pipe.models.dgl_heads import DglHead
from trgl_pipe.models.init import fork_seeded, init_scheme
from trgl_pipe.models.initial_state import load_initial_state
from trgl_pipe.models.random_stream import RandomStream, is_stochastic
from trgl_pipe.models.sedona_heads import FINAL_DIM, SedonaHead, sedona_expand
from trgl_pipe.objectives import LocalInputs, ModuleSpec, Objective, build_objective
from trgl_pipe.optim import build_optimizer, build_scheduler
from trgl_pipe.partition import Partition
from trgl_pipe.runtime.messages import SPLITS as EVAL_SPLITS  # the rows of the evaluation sums


class ModuleBody(nn.Module):
    """T_k: an optional stem followed by consecutive residual blocks.

    ``forward`` returns the output and C_k, the summed kinetic energy of the blocks. With
    ``kinetic_grad=False`` C_k is computed on detached residuals (for reporting only), so
    VanGL keeps no residual alive for autograd.
    """

    def __init__(
        self,
        stem: nn.Module | None,
        blocks: list[nn.Module],
        first_block: int,
        reduction: str = "sum",
    ) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.first_block = first_block
        self.reduction = reduction

    def forward(self, x: Tensor, kinetic_grad: bool = True, per_block: bool = False) -> tuple[Tensor, Tensor]:
        """Returns T_k(x) and C_k, or with ``per_block`` the vector of each block's energy."""
        if self.stem is not None:
            x = self.stem(x)
        energies = []
        for block in self.blocks:
            if kinetic_grad:  # the energy enters the loss: fused, differentiable
                x, energy = block.forward_with_energy(x, self.reduction)
            else:  # reported only: computed on the detached residuals, kept alive for nothing
                x, residuals = block(x)
                energy = x.new_zeros((), dtype=torch.float32)
                for r in residuals:
                    energy = energy + kinetic_energy(r.detach(), self.reduction)
            energies.append(energy)
        if per_block:
            return x, torch.stack(energies)
        total = energies[0]
        for e in energies[1:]:
            total = total + e
        return x, total


class LocalNet(nn.Module):
    """T_k then F_k (and the objective's auxiliary networks) as one module: what a data-parallel
    replica wraps (one gradient all-reduce)."""

    def __init__(
        self,
        body: ModuleBody,
        head: nn.Module,
        objective: Objective,
        aux: nn.ModuleDict | None = None,
    ) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.objective = objective
        self.aux = aux if aux is not None else nn.ModuleDict()
        self.probe_head = objective is not None and objective.probe_head

    def forward(
        self,
        x: Tensor,
        kinetic_grad: bool = True,
        per_block: bool = False,
        image: Tensor | None = None,
        extras: bool = False,
    ) -> tuple[Tensor, ...]:
        """T_k(x), C_k and F_k's logits; with ``extras`` also what the objective's networks
        computed (a dict). A probe head reads the detached output: it only measures accuracy."""
        out, energy = self.body(x, kinetic_grad=kinetic_grad, per_block=per_block)
        if self.objective is not None and self.objective.feeds_head:  # F_k reads what forward made
            found = self.objective.forward(self.aux, x, out, image)
            seen = found["head_input"]
            logits = self.head(seen.detach() if self.probe_head else seen)
            return (out, energy, logits, found) if extras else (out, energy, logits)
        logits = self.head(out.detach() if self.probe_head else out)
        if not extras:
            return out, energy, logits
        assert self.objective is not None
        return out, energy, logits, self.objective.forward(self.aux, x, out, image)


@dataclass(frozen=True, slots=True)
class StagePlan:
    """What module ``index`` of ``num_modules`` holds: blocks ``start..stop-1``."""

    index: int
    num_modules: int
    start: int
    stop: int

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_modules - 1


class _Sums:
    """Running sums kept on the device: reading them is the only host sync."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.values = torch.zeros(4, device=self.device, dtype=torch.float64)  # loss, ce, kin, correct
        self.samples = 0
        self.steps = 0

    def add(self, loss: Tensor, ce: Tensor, kinetic: Tensor, correct: Tensor, n: int) -> None:
        parts = (loss.detach() * n, ce.detach() * n, kinetic.detach() * n, correct)
        self.values += torch.stack([t.double() for t in parts])
        self.samples += n
        self.steps += 1

    def means(self) -> dict[str, float]:
        loss, ce, kinetic, correct = (self.values / max(1, self.samples)).tolist()
        return {"loss": loss, "ce": ce, "kinetic": kinetic, "accuracy": correct}


def allow_nondeterministic(index: int, findings: list[Finding]) -> None:
    """train.deterministic on CUDA with operations that have no deterministic CUDA kernel (found by
    :func:`audit_cuda_determinism`): torch warns there instead of failing, and the run says so."""
    if not findings:
        return
    torch.use_deterministic_algorithms(True, warn_only=True)
    print(
        f"train.deterministic: module {index} runs operations without a deterministic CUDA kernel: "
        + ", ".join(str(f) for f in findings)
        + "; torch now warns instead of failing on them, for every module of this process, and those "
        "steps may differ from run to run (a head's pool is exact where its map divides into the bins: "
        "aux.pool_kernel or aux.pool_size)",
        flush=True,
    )


def _identity(t: Tensor) -> Tensor:
    return t


class Stage:
    """Module k, its head, optimizer, schedule and objective; one per rank in the pipeline.

    Data parallelism is applied from outside (:mod:`trgl_pipe.training.replicas`): it wraps
    ``net`` and sets ``reduce_sum`` (evaluation counts summed over the replicas) and
    ``sync_buffers`` (BatchNorm statistics from replica 0 before an evaluation). Alone, both are
    no-ops.
    """

    def __init__(
        self,
        plan: StagePlan,
        body: ModuleBody,
        head: nn.Module,
        cfg: Config,
        total_steps: int,
        steps_per_epoch: int,
        device: torch.device,
        objective: Objective,
        aux: nn.ModuleDict | None = None,
    ) -> None:
        self.plan = plan
        self.index = plan.index
        self.device = device
        self.body = body.to(device)
        self.head = head.to(device)
        self.channels_last = cfg.train.channels_last
        self.upcast_input = cfg.pipeline.wire_dtype is not None and plan.index > 0
        if self.channels_last:
            self.body.to(memory_format=torch.channels_last)
            self.head.to(memory_format=torch.channels_last)
        self.objective = objective
        self.local_net = LocalNet(self.body, self.head, objective, aux)
        self.aux = self.local_net.aux.to(device)
        # the stage asks the objective's networks for more than C_k and the logits
        self.extended = len(self.aux) > 0
        self.label_smoothing = cfg.optim.label_smoothing
        self.optimizer = build_optimizer(self.parameters(), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, total_steps, steps_per_epoch)
        self.total_steps = total_steps
        self.autocast_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None
        self.compiled = cfg.train.compile
        if cfg.train.compile:
            self.body.compile()
            self.head.compile()
        self.seed = cfg.seed
        # dropout / stochastic depth draw from the module's own stream (None: nothing random)
        self.random: RandomStream | None = (
            RandomStream(cfg.seed, plan.index, device) if is_stochastic(self.local_net) else None
        )
        self.net: nn.Module = self.local_net  # a DDP wrapper when the stage has replicas
        self.reduce_sum: Callable[[Tensor], Tensor] = _identity
        self.sync_buffers: Callable[[], None] = lambda: None
        self._buffers_stale = True  # trained since the last evaluation: sync before evaluating
        self.output_shape: tuple[int, ...] | None = None
        self.output_dtype: torch.dtype | None = None
        self.num_steps = 0
        self.train_sums = _Sums(device)
        # per split in EVAL_SPLITS: [CE sum, correct, each block's kinetic energy × samples] on the
        # device, and the sample count on the host (no host→device scalar per batch)
        self.eval_sums: Tensor | None = None
        self.eval_counts = [0] * len(EVAL_SPLITS)
        self._bad_step = torch.full((), -1, device=device, dtype=torch.int64)
        self.last_loss: Tensor | None = None
        self.last_kinetic: Tensor | None = None

    # -- parameters -------------------------------------------------------------------------

    def use_replica_stream(self, replica: int) -> None:
        """Draw dropout and stochastic-depth masks of data-parallel replica ``replica``."""
        if self.random is not None:
            self.random = RandomStream(self.seed, self.index, self.device, replica)

    def parameters(self) -> list[nn.Parameter]:
        return [*self.body.parameters(), *self.head.parameters(), *self.aux.parameters()]

    @property
    def num_params(self) -> int:
        return self.num_body_params + self.num_head_params + self.num_aux_params

    @property
    def num_aux_params(self) -> int:
        """Parameters of the objective's networks besides F_k (InfoPro's decoder, ...)."""
        return sum(p.numel() for p in self.aux.parameters())

    @property
    def num_body_params(self) -> int:
        return sum(p.numel() for p in self.body.parameters())

    @property
    def num_head_params(self) -> int:
        return sum(p.numel() for p in self.head.parameters())

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- compute ----------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _prepare(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x = x.to(self.device, non_blocking=True)
        if x.dtype in (torch.bfloat16, torch.float16) and self.upcast_input:
            x = x.float()  # an activation cast for the wire (pipeline.wire_dtype): back to float32
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def _loss(
        self, x: Tensor, y: Tensor, image: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self._local_loss(x, y, image)[:5]

    def _local_loss(
        self, x: Tensor, y: Tensor, image: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, LocalInputs]:
        objective = self.objective
        extras: dict[str, Tensor] = {}
        with self._autocast():
            if self.extended:
                out, kinetic, logits, extras = self.net(
                    x, kinetic_grad=objective.uses_kinetic, image=image, extras=True
                )
            else:
                out, kinetic, logits = self.net(x, kinetic_grad=objective.uses_kinetic)
        ce = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        inputs = LocalInputs(x, out, kinetic, logits, ce, y, image, extras)
        return out, kinetic, logits, ce, objective.loss(inputs), inputs

    def train_step(
        self,
        x: Tensor,
        y: Tensor,
        image: Tensor | None = None,
        *,
        input_gradient: bool = False,
        before_update: Callable[[], None] | None = None,
    ) -> Tensor:
        """One local update of T_k, F_k and the objective's networks; returns T_k(x) detached.

        ``image`` is the batch's input image, for an objective that reads it (InfoPro). With
        ``input_gradient`` the gradient of the objective's ``loss_for_previous`` with respect to
        ``x`` is kept as ``last_input_gradient`` (for module k-1: HPFF); ``before_update`` runs
        after the backward, before the optimizer's step (to add a gradient from module k+1).
        """
        x, y = self._prepare(x, y)
        if input_gradient:
            x = x.detach().requires_grad_()
        if image is not None:
            image = image.to(self.device, non_blocking=True)
        self.local_net.train()
        with self.random.active() if self.random is not None else contextlib.nullcontext():
            out, kinetic, logits, ce, loss, inputs = self._local_loss(x, y, image)
        part = self.objective.loss_for_previous(inputs) if input_gradient else None
        del inputs  # what the objective's networks computed must not outlive the backward
        self.optimizer.zero_grad(set_to_none=True)
        if input_gradient:
            assert part is not None, "input_gradient needs the objective's loss_for_previous"
            (self.last_input_gradient,) = torch.autograd.grad(part, x, retain_graph=True)
            del part
        loss.backward()
        if before_update is not None:
            before_update()
        self.optimizer.step()
        self.scheduler.step()
        self.num_steps += 1
        self._buffers_stale = True
        correct = (logits.detach().argmax(1) == y).sum()
        self.train_sums.add(loss, ce, kinetic, correct, int(y.shape[0]))
        bad = ~torch.isfinite(loss.detach())
        self._bad_step = torch.where(bad & (self._bad_step < 0), self.num_steps, self._bad_step)
        self.last_loss = loss.detach()
        self.last_kinetic = kinetic.detach()
        return out.detach()

    def replay_gradient(self, x: Tensor, grad: Tensor) -> None:
        """Add to the body's gradients ``grad`` backpropagated through T_k at ``x``, with the
        current weights in training mode (a gradient that module k+1 sent one step late)."""
        x, _ = self._prepare(x, torch.empty(0))
        self.body.train()
        with self._autocast():
            out, _ = self.body(x, kinetic_grad=False)
        out.backward(grad.to(out.device, out.dtype))

    @torch.no_grad()
    def forward_frozen(self, x: Tensor) -> Tensor:
        """Output of a frozen module: eval mode (BatchNorm statistics do not move), no graph."""
        x, _ = self._prepare(x, torch.empty(0))
        self.body.eval()
        with self._autocast():
            out, _ = self.body(x, kinetic_grad=False)
        self.output_shape, self.output_dtype = tuple(out.shape[1:]), out.dtype
        return out

    @torch.no_grad()
    def eval_step(self, x: Tensor, y: Tensor | None, split: str) -> Tensor:
        """Accumulate the accuracy of F_k∘G_k on ``split``; returns T_k(x) for the next module.

        Runs the module itself, not a replica wrapper: replicas evaluate their shards alone and
        sum their counts at the end (:meth:`pop_eval_results`). An empty shard (fewer samples in a
        batch than replicas) counts nothing and passes an empty output on.
        """
        if self._buffers_stale:
            self.sync_buffers()
            self._buffers_stale = False
        row = EVAL_SPLITS.index(split)
        n = 0 if y is None else int(y.shape[0])
        if n == 0:
            shape = self.output_shape
            if shape is None:
                x, _ = self._prepare(x, torch.empty(0, dtype=torch.int64))
                shape = tuple(self.body(x[:0], kinetic_grad=False)[0].shape[1:])
            dtype = self.output_dtype or x.dtype
            return torch.empty((0, *shape), device=self.device, dtype=dtype)
        x, y = self._prepare(x, y)
        self.local_net.eval()
        with self._autocast():
            out, energies, logits = self.local_net(x, kinetic_grad=False, per_block=True)
        ce = F.cross_entropy(logits.float(), y, reduction="sum")
        correct = (logits.argmax(1) == y).sum()
        if self.eval_sums is None:
            blocks = len(self.body.blocks)
            self.eval_sums = torch.zeros(
                (len(EVAL_SPLITS), 2 + blocks), device=self.device, dtype=torch.float64
            )
        self.eval_sums[row, 0] += ce.double()
        self.eval_sums[row, 1] += correct.double()
        self.eval_sums[row, 2:] += energies.double() * n
        self.eval_counts[row] += n
        return out

    def pop_eval_results(self) -> dict[str, dict[str, Any]]:
        """Accuracy, CE and kinetic energy per split since the last call (over all replicas).

        Every replica reduces one tensor of the same shape per evaluation, whatever its shards
        held (an empty one included), so their collectives always match.
        """
        sums = self.eval_sums
        if sums is None:
            sums = torch.zeros(
                (len(EVAL_SPLITS), 2 + len(self.body.blocks)), device=self.device, dtype=torch.float64
            )
        counts = torch.tensor(self.eval_counts, dtype=torch.float64).to(self.device)
        table = self.reduce_sum(torch.cat([sums, counts[:, None]], dim=1)).tolist()
        results = {}
        for split, row in zip(EVAL_SPLITS, table, strict=True):
            ce_sum, correct, blocks, count = row[0], row[1], row[2:-1], row[-1]
            if count == 0:  # no sample of this split anywhere (an empty split)
                continue
            block_means = [b / count for b in blocks]
            results[split] = {
                "accuracy": correct / count,
                "ce": ce_sum / count,
                "kinetic_energy": sum(block_means),
                "block_kinetic_energy": block_means,
                "count": int(count),
            }
        self.eval_sums = None
        self.eval_counts = [0] * len(EVAL_SPLITS)
        return results

    def pop_train_stats(self) -> dict[str, float]:
        """Mean loss, CE, kinetic energy and accuracy since the last call, then reset."""
        stats = self.train_sums.means()
        stats["samples"] = self.train_sums.samples
        self.train_sums.reset()
        return stats

    def warm_up(
        self,
        feature_shape: tuple[int, ...],
        dtype: torch.dtype,
        train_sizes: list[int],
        eval_sizes: list[int],
    ) -> None:
        """Compile every batch size and mode this stage will see, before training starts.

        torch.compile is lazy: without this, the first training step, the first evaluation and the
        first partial batch would each stop this rank for a compile while its neighbours wait.
        Runs forward and backward without an optimizer step and restores the BatchNorm buffers,
        so the stage's state is unchanged. A no-op for eager stages.
        """
        if not self.compiled:
            return
        net = self.local_net
        saved = {name: b.clone() for name, b in net.named_buffers()}

        def batch(n: int) -> Tensor:  # through _prepare, as a step gets it (channels_last too)
            x = torch.zeros((n, *feature_shape), dtype=dtype)
            return self._prepare(x, torch.zeros(n, dtype=torch.int64))[0]

        for n in train_sizes:  # one pass each (the replicas' counts agree: runtime warm_up_sizes)
            x = batch(n)
            net.train()
            with self._autocast():
                _, kinetic, logits = net(x, kinetic_grad=self.objective.uses_kinetic)
            (logits.float().sum() + kinetic.float()).backward()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            net.eval()
            for n in dict.fromkeys(s for s in eval_sizes if s > 0):
                x = batch(n)
                with self._autocast():
                    net(x, kinetic_grad=False, per_block=True)
            for name, b in net.named_buffers():
                b.copy_(saved[name])

    def check_finite(self) -> None:
        """Raise if any local loss so far was NaN or infinite (one host sync)."""
        bad_step = int(self._bad_step)
        if bad_step >= 0:
            raise NonFiniteLossError(
                f"module {self.index}: the local loss became NaN or infinite at its step {bad_step}; "
                + (
                    "lower optim.lr or raise trgl.tau"
                    if self.objective.uses_kinetic
                    else "lower optim.lr (or the objective's loss weights)"
                )
            )

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "body": self.body.state_dict(),
            "head": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "objective": self.objective.state_dict(),
            **({"aux": self.aux.state_dict()} if self.extended else {}),
            "num_steps": self.num_steps,
            **({"random": self.random.state_dict()} if self.random is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.body.load_state_dict(state["body"])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.objective.load_state_dict(state["objective"])
        if self.extended:
            self.aux.load_state_dict(state["aux"])
        self.num_steps = int(state["num_steps"])
        if self.random is not None and "random" in state:
            self.random.load_state_dict(state["random"])


def make_aux_head(
    backbone: Backbone, block: int, module: int, num_modules: int, num_classes: int, cfg: Config
) -> nn.Module:
    """An auxiliary head for a module (index ``module`` of ``num_modules``) ending after ``block``,
    chosen by the shape of that block's output (unseeded: the caller seeds): feature maps get the
    conv head, tokens the token head, vectors a linear one; ``aux.head`` names a user builder."""
    if cfg.aux.head is not None:
        from trgl_pipe.models.user import user_head

        head = user_head(cfg.aux.head, backbone.shapes[block], num_classes, module, num_modules)
        if cfg.model.init != "default":
            init_scheme(head, cfg.model.init, cfg.model.init_gain)
        return head
    kind = backbone.kind(block)
    channels = backbone.channels(block) if kind else 0
    if cfg.aux.type != "conv" and kind != "map":
        raise ConfigError(
            f"aux.type={cfg.aux.type} is a head for [N, C, H, W] feature maps; block {block} of "
            f"model.arch={backbone.arch} gives {kind or 'other'} outputs: use aux.type=conv"
        )
    if kind == "tokens":
        head: nn.Module = TokenHead(channels, num_classes, cfg.aux.hidden)
    elif kind == "vector":
        head = VectorHead(channels, num_classes, cfg.aux.hidden)
    elif kind == "map" and cfg.aux.type == "sedona":
        head = SedonaHead(
            channels,
            num_classes,
            backbone.spatial(block),
            cfg.aux.for_module("depth", module, num_modules),
            cfg.aux.expand or sedona_expand(cfg.model.arch),
            cfg.aux.channels or FINAL_DIM,
        )
    elif kind == "map" and cfg.aux.type != "conv":  # DGL's CNN or MLP-SR head
        head = DglHead(channels, num_classes, backbone.spatial(block), cfg.aux.type.removeprefix("dgl_"))
    elif kind == "map":
        head = AuxHead(
            channels,
            num_classes,
            cfg.aux.for_module("pool_size", module, num_modules) or 2,
            cfg.aux.channels,
            cfg.aux.hidden,
            pool_kernel=cfg.aux.for_module("pool_kernel", module, num_modules),
            spatial=backbone.spatial(block),
        )
    else:
        raise ConfigError(
            f"model.arch={backbone.arch}: block {block} gives outputs of shape "
            f"[N, {', '.join(map(str, backbone.shapes[block]))}], which no built-in auxiliary head "
            "takes ([N, C, H, W] maps, [N, L, D] tokens, [N, D] vectors); end modules elsewhere "
            "(model.split) or name a head builder in aux.head"
        )
    init_scheme(head, cfg.model.init, cfg.model.init_gain)
    return head


def build_head(backbone: Backbone, plan: StagePlan, num_classes: int, cfg: Config) -> nn.Module:
    """F_k: the network's own head for the last module (unless ``aux.last=aux`` or the network has
    none), an auxiliary head otherwise, seeded by (seed, k, its last block) so it does not depend
    on the rank."""
    if plan.is_last and cfg.aux.last == "own" and backbone.head is not None:
        return backbone.head
    with fork_seeded(cfg.seed, 3, plan.index, plan.stop):
        return make_aux_head(backbone, plan.stop - 1, plan.index, plan.num_modules, num_classes, cfg)


def build_parts(cfg: Config, input_shape: tuple[int, int, int], num_classes: int) -> Backbone:
    """The whole network the run cuts into modules (every rank builds it, seeded alike)."""
    return build_backbone(cfg.model, input_shape, num_classes, cfg.seed)


def build_stage(
    cfg: Config,
    parts: Backbone,
    partition: Partition,
    index: int,
    num_classes: int,
    total_steps: int,
    steps_per_epoch: int,
    device: torch.device,
    transform: Callable[[nn.Module], nn.Module] | None = None,
    normalization: dict | None = None,
) -> Stage:
    """Stage ``index`` of ``partition`` (the stem goes with module 0).

    ``transform`` rewrites the body, the head and the objective's networks before the optimizer
    sees their parameters (SyncBatchNorm for data-parallel replicas). ``normalization`` (the
    images' per-channel mean and std) lets an objective restore the image (InfoPro).
    """
    if cfg.train.deterministic and device.type == "cuda":
        findings = audit_cuda_determinism(cfg, parts, partition, index, num_classes, normalization)
        allow_nondeterministic(index, findings)
    start, stop = partition[index]
    plan = StagePlan(index, len(partition), start, stop)
    body = ModuleBody(
        parts.stem if plan.is_first else None, parts.blocks[start:stop], start, cfg.trgl.reduction
    )
    objective, own_head, aux = module_objective(
        cfg, module_spec(parts, plan, num_classes, normalization, device)
    )
    head = own_head if own_head is not None else build_head(parts, plan, num_classes, cfg)
    if cfg.model.init_state:
        load_initial_state(cfg.model.init_state, index, len(partition), body, head)
    if transform is not None:
        body, head, aux = transform(body), transform(head), transform(aux)
    return Stage(plan, body, head, cfg, total_steps, steps_per_epoch, device, objective, aux)


def audit_cuda_determinism(
    cfg: Config,
    parts: Backbone,
    partition: Partition,
    index: int,
    num_classes: int,
    normalization: dict | None = None,
) -> list[Finding]:
    """The operations of module ``index``'s training step (body, head, the objective's networks,
    the local loss, backward) that throw on CUDA under deterministic algorithms, each with the
    network that runs it. Found on the CPU, on copies of the module's blocks, with two samples and
    the random state left as it was: the run builds and trains exactly what it would without it."""
    start, stop = partition[index]
    first, last = index == 0, index == len(partition) - 1
    blocks = list(parts.blocks)
    after = stop + 1 if stop < len(blocks) else stop  # the next module's first block: MAN copies it
    blocks[start:after] = [_meta_copy(b) for b in parts.blocks[start:after]]
    own = dataclasses.replace(
        parts,
        stem=_meta_copy(parts.stem) if first else parts.stem,
        blocks=blocks,
        head=_meta_copy(parts.head) if last else parts.head,
    )
    plain = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, compile=False, channels_last=False),
        model=dataclasses.replace(cfg.model, init_state=None),
    )
    meta = torch.device("meta")  # the operations are recorded as dispatched; nothing is computed
    with torch.random.fork_rng(devices=[]):
        stage = build_stage(plain, own, partition, index, num_classes, 1, 1, meta, None, normalization)
        x = torch.zeros(2, *(parts.input_shape if first else parts.input_of(start)), device=meta)
        y = torch.zeros(2, dtype=torch.int64, device=meta)
        image = torch.zeros(2, *parts.input_shape, device=meta) if stage.objective.needs_image else None

        def step() -> None:
            stage.net.train()
            stage._loss(x, y, image)[-1].backward()

        networks = {"body": stage.body, "head": stage.head, **{f"aux.{n}": m for n, m in stage.aux.items()}}
        return audit(step, networks)


def _meta_copy(module: nn.Module | None) -> nn.Module | None:
    """A copy of ``module`` whose parameters and buffers are on the meta device (no data copied)."""
    if module is None:
        return None
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def module_head(backbone: Backbone, plan: StagePlan, num_classes: int, cfg: Config) -> nn.Module:
    """F_k as training builds it: the objective's own classifier (InfoPro, PredSim), else the
    ``aux`` section's (for an export, which then loads the trained weights)."""
    _, own, _ = module_objective(cfg, module_spec(backbone, plan, num_classes, None, torch.device("cpu")))
    return own if own is not None else build_head(backbone, plan, num_classes, cfg)


def module_objective(cfg: Config, spec: ModuleSpec) -> tuple[Objective, nn.Module | None, nn.ModuleDict]:
    """The one place a module's objective is built, with its own classifier (None: the ``aux``
    section's) and its networks, seeded by (seed, k, last block) so they are the same on any rank."""
    with fork_seeded(cfg.seed, 5, spec.index, spec.last_block):
        objective = build_objective(cfg, spec)
        return objective, objective.head(), objective.networks()


def module_spec(
    parts: Backbone, plan: StagePlan, num_classes: int, normalization: dict | None, device: torch.device
) -> ModuleSpec:
    """What an objective may know of module ``plan.index``: the shapes around it, the images'."""
    norm = normalization or {}
    return ModuleSpec(
        index=plan.index,
        num_modules=plan.num_modules,
        in_shape=parts.input_shape if plan.is_first else parts.input_of(plan.start),
        out_shape=parts.shapes[plan.stop - 1],
        image_shape=parts.input_shape,
        num_classes=num_classes,
        tokens=parts.tokens,
        mean=tuple(norm.get("mean", ())),
        std=tuple(norm.get("std", ())),
        device=str(device),
        last_block=plan.stop,
        later_shapes=tuple(tuple(s) for s in parts.shapes[plan.stop :]),
        next_block=parts.blocks[plan.stop] if plan.stop < len(parts.blocks) else None,
    )
