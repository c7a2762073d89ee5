"""Typed configuration: one dataclass per section, YAML files, ``section.key=value`` overrides.

Every key is checked before any work starts. A bad key, type or combination raises
:class:`~trgl_pipe.errors.ConfigError` whose one-line message names the key and what is allowed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from trgl_pipe.errors import ConfigError

MAX_TIMEOUT_S = 7 * 24 * 3600

DatasetName = Literal[
    "fashion_mnist", "mnist", "cifar10", "cifar100", "stl10", "tiny_imagenet", "image_folder", "synthetic"
]


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Which images, how many, and how they are batched."""

    # a built-in dataset, or "pkg.mod:callable" returning (train, test) (see docs/your-own-network.md)
    name: DatasetName | str = "fashion_mnist"
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to a data.name callable
    # auto: data.root if set, else Debian's dataset-fashion-mnist files, else the embedded subset.
    source: Literal["auto", "root", "debian", "embedded", "download"] = "auto"
    # the folder the dataset was extracted into, in its distributed layout (CIFAR-10: the parent
    # of cifar-10-batches-py)
    root: str | None = None
    train_size: int | None = None  # use only the first N training images (after a seeded shuffle)
    class_balanced: bool = False  # train_size holds the same number of images of every class
    val_size: int = 5000  # held out from the training set, picks the best module
    test_size: int | None = None  # use only the first N test images
    batch_size: int = 128  # the global batch: a stage's replicas split it between them
    eval_batch_size: int = 512  # evaluation batches (global, like batch_size)
    num_workers: int = 0  # threads preparing batches ahead of the training loop
    augment: bool = False  # random crop after zero padding, and horizontal flip
    # augment: zero padding of the random crop; null: 4, or 2 for images of 28x28 or less
    crop_padding: int | None = None
    image_size: int = 32  # synthetic: side length; image_folder: images are resized to this
    channels: int = 3  # synthetic only
    num_classes: int = 10  # synthetic only
    cache_dir: str | None = None  # decoded image folders (TinyImageNet, image_folder); null: beside the data

    @property
    def is_user(self) -> bool:
        """The dataset comes from a user callable (``pkg.mod:callable``)."""
        return self.name not in get_args(DatasetName)

    def __post_init__(self) -> None:
        if self.is_user:
            _import_path("data.name", self.name, get_args(DatasetName))
        elif self.kwargs:
            raise ConfigError(f"data.kwargs applies to a data.name import path, not data.name={self.name}")
        _positive("data.batch_size", self.batch_size)
        _positive("data.eval_batch_size", self.eval_batch_size)
        _positive("data.image_size", self.image_size)
        _positive("data.num_classes", self.num_classes, minimum=2)
        _non_negative("data.val_size", self.val_size)
        _non_negative("data.num_workers", self.num_workers)
        if self.crop_padding is not None:
            _non_negative("data.crop_padding", self.crop_padding)
        if self.channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 or 3, got {self.channels}")
        for key in ("train_size", "test_size"):
            value = getattr(self, key)
            if value is not None:
                _positive(f"data.{key}", value)
        if self.source == "root" and not self.root and self.name != "synthetic":
            raise ConfigError("data.source=root needs data.root (the folder that holds the dataset)")


ObjectiveName = Literal["trgl", "vangl", "infopro", "infopro_l", "predsim", "auglocal", "man", "hpff"]
Arch = Literal[
    "cifar_resnet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "vgg11_bn",
    "vgg13_bn",
    "vgg16_bn",
    "vgg19_bn",
    "vgg19",
    "swin_t",
    "swin_s",
    "swin_b",
]
# residual blocks (transport blocks) of each fixed architecture; cifar_resnet has 3n for depth 6n+2
ARCH_BLOCKS = {
    "resnet18": 8,
    "resnet34": 16,
    "resnet50": 16,
    "resnet101": 33,
    "resnet152": 50,
    "vgg11_bn": 8,
    "vgg13_bn": 10,
    "vgg16_bn": 13,
    "vgg19_bn": 16,
    "vgg19": 16,
    "swin_t": 15,  # 12 Swin blocks and the 3 patch-merging layers between the 4 stages
    "swin_s": 27,
    "swin_b": 27,
}


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The backbone and how its blocks are cut into modules."""

    # a built-in backbone, or "pkg.mod:callable" building the network (see docs/your-own-network.md)
    arch: Arch | str = "cifar_resnet"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to a model.arch callable
    # cifar_resnet: ResNet-(6n+2) with 3n blocks of widths w, 2w, 4w
    depth: int = 20  # 6n+2: 8, 14, 20, 32, 56, 110, ...
    width: int = 16  # channels of the first stage; the stages use width, 2*width, 4*width
    block: Literal["preact", "postact"] = "preact"  # cifar_resnet: pre- or post-activation blocks
    shortcut: Literal["conv", "pad"] = "conv"  # downsampling shortcut: 1x1 conv, or pool + zero channels
    # initialisation: default (the architecture's own), or the authors' kaiming / orthogonal
    init: Literal["default", "kaiming", "orthogonal"] = "default"
    init_gain: float = 0.05  # orthogonal
    init_from: str | None = None  # torchvision backbones: a torchvision state_dict to start from
    # every module's initial weights from a file (trgl_pipe.models.initial_state), after the init above
    init_state: str | None = None
    small_input: bool = False  # torchvision ResNets: no max-pool in the stem (64x64 images)
    patch_size: int = 4  # Swin
    window_size: int = 7  # Swin
    stochastic_depth: float | None = None  # Swin; null: torchvision's value for the variant
    vgg_transport: Literal["displacement", "off"] = "displacement"  # VGG: ||T(x) - x||^2 where shapes match
    num_modules: int = 4  # K
    # depth: equal numbers of blocks; balanced: equal measured cost; preset: the authors' split for
    # this backbone and K; or the K-1 indices of the blocks where modules 2..K start.
    split: Literal["depth", "balanced", "preset"] | list[int] = "depth"
    balance_by: Literal["time", "memory"] = "time"  # split=balanced: the cost measured per block

    @property
    def is_user(self) -> bool:
        """The network comes from a user callable (``pkg.mod:callable``)."""
        return self.arch not in get_args(Arch)

    @property
    def num_blocks(self) -> int | None:
        """Blocks of a built-in backbone; None for a user network (known once it is built)."""
        if self.is_user:
            return None
        if self.arch == "cifar_resnet":
            return 3 * ((self.depth - 2) // 6)
        return ARCH_BLOCKS[self.arch]

    @property
    def name(self) -> str:
        return f"ResNet-{self.depth}" if self.arch == "cifar_resnet" else self.arch

    def __post_init__(self) -> None:
        if self.is_user:
            _import_path("model.arch", self.arch, get_args(Arch))
        elif self.arch_kwargs:
            raise ConfigError(
                f"model.arch_kwargs applies to a model.arch import path, not model.arch={self.arch}"
            )
        if self.arch == "cifar_resnet" and (self.depth < 8 or (self.depth - 2) % 6 != 0):
            raise ConfigError(
                f"model.depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, 110, ...), got {self.depth}"
            )
        _positive("model.width", self.width)
        _positive("model.num_modules", self.num_modules)
        _positive("model.patch_size", self.patch_size)
        _positive("model.window_size", self.window_size)
        _positive("model.init_gain", self.init_gain)
        if self.num_blocks is None:  # a user network: checked against its blocks once built
            if isinstance(self.split, list) and (
                len(self.split) != self.num_modules - 1 or sorted(set(self.split)) != self.split
            ):
                raise ConfigError(
                    f"model.split={self.split} must be {self.num_modules - 1} strictly increasing "
                    f"block indices (where modules 2..K start) for model.num_modules={self.num_modules}"
                )
            return
        if self.num_modules > self.num_blocks:
            raise ConfigError(
                f"model.num_modules={self.num_modules} is larger than the {self.num_blocks} "
                f"residual blocks of a {self.name}; use at most {self.num_blocks} modules"
                + (" or a deeper model.depth" if self.arch == "cifar_resnet" else "")
            )
        if isinstance(self.split, list):
            cuts = self.split
            if len(cuts) != self.num_modules - 1:
                raise ConfigError(
                    f"model.split lists {len(cuts)} block indices; with model.num_modules="
                    f"{self.num_modules} it needs {self.num_modules - 1} (where modules 2..K start)"
                )
            if any(b <= a for a, b in zip([0, *cuts], [*cuts, self.num_blocks], strict=True)):
                raise ConfigError(
                    f"model.split={cuts} must be strictly increasing block indices between 1 and "
                    f"{self.num_blocks - 1}"
                )


@dataclass(kw_only=True, slots=True)
class AuxConfig:
    """The auxiliary classifier F_k of every module (DGL style; the last one's by ``last``).

    CNN backbones: 3x3 conv -> ReLU -> average pool -> BatchNorm -> linear. Swin: LayerNorm ->
    mean over tokens -> linear. Pooling and width may differ per module: a list gives one value
    per module.
    """

    pool_size: int | list[int] = 2  # p: the feature map is average-pooled to p x p
    pool_kernel: int | list[int] | None = None  # instead: the authors' AvgPool2d(kernel) per module
    # of the 3x3 conv (conv; None = the module's output channels) or the last 1x1 conv (sedona; None = 512)
    channels: int | None = None
    hidden: int = 0  # 0: one linear layer; >0: linear -> ReLU -> linear with this width
    last: Literal["own", "aux"] = "own"  # the last module's head: the network's own, or an aux head
    # "pkg.mod:callable" building every auxiliary head from (shape, num_classes, module, num_modules)
    head: str | None = None
    # conv: the head above; dgl_cnn / dgl_mlp_sr: DGL's CNN and MLP-SR heads (Belilovsky et al. 2020);
    # sedona: SEDONA's decoder (Pyeon et al. 2021), `depth` deep, inverted residuals of `expand`
    type: Literal["conv", "dgl_cnn", "dgl_mlp_sr", "sedona"] = "conv"
    # sedona: 1 + its inverted residual blocks (python -m trgl_pipe.search picks one per module, 1-4)
    depth: int | list[int] = 1
    expand: int | None = None  # sedona: None = SEDONA's (1 for basic-block ResNets, else 4)

    def __post_init__(self) -> None:
        for key in ("pool_size", "pool_kernel", "depth"):
            value = getattr(self, key)
            for v in value if isinstance(value, list) else [] if value is None else [value]:
                _positive(f"aux.{key}", v)
        _non_negative("aux.hidden", self.hidden)
        if self.head is not None:
            _import_path("aux.head", self.head, ())
        if self.channels is not None:
            _positive("aux.channels", self.channels)
        if self.expand is not None:
            _positive("aux.expand", self.expand)

    def for_module(self, key: str, index: int, num_modules: int) -> int | None:
        """``pool_size``, ``pool_kernel`` or ``depth`` of module ``index`` (a list gives one per module)."""
        value = getattr(self, key)
        if not isinstance(value, list):
            return value
        if len(value) != num_modules:
            raise ConfigError(
                f"aux.{key} lists {len(value)} values for {num_modules} modules; give one per module"
            )
        return value[index]


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """The training regime and its length."""

    # e2e: backprop; parallel: every batch through all modules, each updates itself (the pipeline);
    # sequential: module after module; multilap: sequential in laps; ddg, fr: delayed gradients
    regime: Literal["e2e", "parallel", "sequential", "multilap", "ddg", "fr"] = "parallel"
    # ddg, fr: "paper": module k of K applies the gradient of the batch it forwarded K-1-k steps
    # ago; "none": at once (DDG is then plain backpropagation cut into modules)
    delays: Literal["paper", "none"] = "paper"
    epochs: int = 10  # per module (sequential, multilap) or for the whole network (e2e, parallel)
    laps: int = 1  # multilap: R laps of epochs/R epochs per module
    eval_every_epochs: int = 1  # 0: evaluate only at the end
    max_steps: int | None = None  # stop each module after this many steps (quick tests, benchmarks)
    deterministic: bool = False  # torch's deterministic algorithms (refused where CUDA has none)
    num_threads: int | None = None  # torch intra-op threads per process; None: cores / ranks
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast on CUDA and CPU
    channels_last: bool = False  # activations in NHWC memory layout (often faster convolutions on GPUs)
    compile: bool = False  # torch.compile each module and head

    def __post_init__(self) -> None:
        if self.delays != "paper" and self.regime not in ("ddg", "fr"):
            raise ConfigError(
                f"train.delays={self.delays} applies to train.regime=ddg or fr only "
                f"(regime is {self.regime}); remove it"
            )
        _positive("train.epochs", self.epochs)
        _positive("train.laps", self.laps)
        _non_negative("train.eval_every_epochs", self.eval_every_epochs)
        if self.num_threads is not None:
            _positive("train.num_threads", self.num_threads)
        if self.max_steps is not None:
            _positive("train.max_steps", self.max_steps)
        if self.regime == "multilap":
            if self.epochs % self.laps:
                raise ConfigError(
                    f"train.epochs={self.epochs} must be a multiple of train.laps={self.laps} "
                    "(each lap trains every module for epochs/laps epochs)"
                )
        elif self.laps != 1:
            raise ConfigError(
                f"train.laps={self.laps} applies to train.regime=multilap only "
                f"(regime is {self.regime}); remove it or set train.regime=multilap"
            )


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """One optimizer and LR schedule per module (same settings for all)."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"  # one optimizer per module
    lr: float = 0.1  # initial learning rate of every module
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    weight_decay: float = 5e-4  # L2 on every parameter (decoupled for adamw)
    schedule: Literal["constant", "cosine", "step"] = "cosine"  # per module, over its own steps
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # step: fractions of training
    gamma: float = 0.1  # step: LR factor at each milestone
    warmup_epochs: float = 0.0  # linear warm-up to lr over these epochs
    # cosine: the LR falls from lr to min_lr over schedule_steps optimizer steps of each module
    # (null: over the whole run), whatever the run's length; with schedule_steps set this is
    # torch's CosineAnnealingLR stepped once per step, as in the authors' scripts, so past
    # schedule_steps the rate rises again (period 2 * schedule_steps)
    schedule_steps: int | None = None
    min_lr: float = 0.0  # cosine: the rate it ends at
    label_smoothing: float = 0.0  # of the cross-entropy of every head (0: plain CE)

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"optim.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _non_negative("optim.momentum", self.momentum)
        _non_negative("optim.weight_decay", self.weight_decay)
        _non_negative("optim.warmup_epochs", self.warmup_epochs)
        _non_negative("optim.min_lr", self.min_lr)
        if self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} must not exceed optim.lr={self.lr}")
        if self.schedule_steps is not None:
            _positive("optim.schedule_steps", self.schedule_steps)
            if self.schedule != "cosine" or self.warmup_epochs:
                raise ConfigError(
                    "optim.schedule_steps applies to optim.schedule=cosine without warm-up "
                    f"(schedule is {self.schedule}, warmup_epochs {self.warmup_epochs}); "
                    "remove it or set optim.schedule=cosine optim.warmup_epochs=0"
                )
        if not all(0 < m < 1 for m in self.milestones):
            raise ConfigError(
                f"optim.milestones must be fractions of training in (0, 1), got {self.milestones}"
            )
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ConfigError("optim.nesterov=true needs optim.name=sgd and optim.momentum > 0")


@dataclass(kw_only=True, slots=True)
class TrglConfig:
    """The transport (kinetic energy) term; enabled=false is vanilla greedy training (VanGL)."""

    enabled: bool = True  # false: no kinetic term (VanGL)
    # L = CE + C / (2 tau). With reduction=sum, C grows with the feature count C*H*W (about 1e4 per
    # block on 16x28x28 maps at initialisation): 1e5 suits 28x28 and 32x32 inputs at width 16.
    tau: float = 1.0e5
    # C = sum over blocks of the batch mean of ||r||^2; sum: over all features (the paper's
    # Euclidean norm); mean: divided by the feature count C*H*W (one tau fits every resolution)
    reduction: Literal["sum", "mean"] = "sum"
    # constant: tau for every module; halves: tau for the first half of the modules, 2 tau after;
    # adaptive: lambda_k = 2 tau_k moved by the method of multipliers (lambda_init, h, s)
    tau_schedule: Literal["constant", "halves", "adaptive"] = "constant"
    # halves: which half trgl.tau belongs to. first: tau for modules k < K/2, 2 tau after (ours);
    # second: tau/2 then tau (the authors' scripts take tau as the second half's value)
    halves_tau_of: Literal["first", "second"] = "first"
    lambda_init: float = 2.0e5  # adaptive: L = CE + C / lambda, lambda starts here (lambda = 2 tau)
    h: float = 1.0e4  # adaptive: lambda <- lambda + h * CE ... (in the units of lambda)
    s: int = 50  # adaptive: ... every s steps

    def __post_init__(self) -> None:
        _positive("trgl.tau", self.tau)
        _positive("trgl.lambda_init", self.lambda_init)
        _non_negative("trgl.h", self.h)
        _positive("trgl.s", self.s)


@dataclass(kw_only=True, slots=True)
class ObjectiveConfig:
    """The local objective of every module (see trgl_pipe.objectives and docs/method.md).

    trgl: CE + kinetic energy (the trgl section; trgl.enabled=false is VanGL); vangl: CE only;
    infopro: image reconstruction + a task term (Wang et al. 2021); infopro_l: reconstruction of
    the module's input instead of the image; predsim: prediction + similarity matching (Nøkland &
    Eidnes 2019).
    """

    # a built-in, or "pkg.mod:Class", a subclass of trgl_pipe.Objective built as Class(spec, **kwargs)
    # for each module (see docs/your-own-objective.md); a built-in's name stands for its import path
    name: ObjectiveName | str = "trgl"
    # passed to the objective's class: infopro / infopro_l take loss, weights, widen, feature_dim,
    # temperature; predsim takes beta, dim_in_decoder; auglocal depth, pyramid, widen; man momentum,
    # every, weights, head, widen, feature_dim; hpff weights, local_weight, cascade_weight, widen,
    # feature_dim (docs/method.md); trgl's are the trgl section
    kwargs: dict[str, Any] = field(default_factory=dict)
    # deprecated (one release): the old flat keys of InfoPro and PredSim, moved into kwargs
    infopro_loss: str | None = None
    infopro_weights: list[float] | None = None
    infopro_widen: float | None = None
    infopro_feature_dim: int | None = None
    infopro_temperature: float | None = None
    predsim_beta: float | None = None
    predsim_dim_in_decoder: int | None = None

    def __post_init__(self) -> None:
        builtin = self.name in get_args(ObjectiveName)
        if not builtin and ":" not in self.name:
            raise ConfigError(
                f"objective.name={self.name} is not an objective here; choose one of "
                f"{', '.join(get_args(ObjectiveName))}, or name your own as pkg.module:Class"
            )
        if self.name == "trgl" and self.kwargs:
            raise ConfigError(
                f"objective.kwargs={self.kwargs}: TRGL's settings are the trgl section's keys "
                "(trgl.tau, trgl.tau_schedule, ...); drop objective.kwargs"
            )
        self._move_deprecated_keys()

    def _move_deprecated_keys(self) -> None:
        """Move the old flat keys into ``kwargs`` with a one-line warning naming the new key. A
        run folder written before holds every old key at its default value: those are dropped."""
        for old, (method, new, default) in DEPRECATED_OBJECTIVE_KEYS.items():
            value = getattr(self, old)
            setattr(self, old, None)
            applies = self.name in (("infopro", "infopro_l") if method == "infopro" else (method,))
            if value is None or value == default or not applies:
                continue
            if new in self.kwargs and self.kwargs[new] != value:
                raise ConfigError(
                    f"objective.{old}={value} and objective.kwargs.{new}={self.kwargs[new]} disagree; "
                    f"drop objective.{old} (deprecated)"
                )
            warnings.warn(f"objective.{old} is deprecated: use objective.kwargs.{new}", FutureWarning, 2)
            self.kwargs = {**self.kwargs, new: value}


# old key -> (the method it belongs to, its name in objective.kwargs, its old default)
DEPRECATED_OBJECTIVE_KEYS: dict[str, tuple[str, str, Any]] = {
    "infopro_loss": ("infopro", "loss", "softmax"),
    "infopro_weights": ("infopro", "weights", None),
    "infopro_widen": ("infopro", "widen", 1.0),
    "infopro_feature_dim": ("infopro", "feature_dim", 128),
    "infopro_temperature": ("infopro", "temperature", 0.07),
    "predsim_beta": ("predsim", "beta", 0.99),
    "predsim_dim_in_decoder": ("predsim", "dim_in_decoder", 4096),
}


@dataclass(kw_only=True, slots=True)
class PipelineConfig:
    """How the modules of the parallel regime are spread over workers."""

    # auto: torch.distributed when started by torchrun with several ranks, else one process
    # that passes each batch through all modules in turn. sim: one thread per module with
    # in-process bounded buffers. dist: torch.distributed (needs torchrun).
    transport: Literal["auto", "dist", "sim"] = "auto"
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl where every rank has a GPU of its own
    buffer_size: int = 2  # a module's input slots: its sender runs this many ahead (+1 in flight, dist)
    timeout_s: float = 60.0  # a wait this long for a peer means the peer failed
    # activations between modules cast to this for the wire and back to float32 on arrival (half
    # the bytes); the one-process parallel run applies the same casts. null: as the module computes
    wire_dtype: Literal["bf16", "fp16"] | None = None
    # Layout of the ranks (dist only): each rank holds modules_per_rank consecutive modules (a
    # stage), and each stage runs on `replicas` data-parallel ranks; world size = K / M * R.
    modules_per_rank: int = 1
    replicas: int = 1  # data-parallel replicas of every stage
    # replicas share BatchNorm batch statistics (CUDA only; an all-gather and a host sync per layer)
    sync_batchnorm: bool = False

    def __post_init__(self) -> None:
        _positive("pipeline.buffer_size", self.buffer_size)
        _positive("pipeline.timeout_s", self.timeout_s)
        if self.timeout_s > MAX_TIMEOUT_S:
            raise ConfigError(
                f"pipeline.timeout_s={self.timeout_s:g} is beyond a week ({MAX_TIMEOUT_S} s); a peer silent "
                "that long has failed: use a few minutes"
            )
        _positive("pipeline.modules_per_rank", self.modules_per_rank)
        _positive("pipeline.replicas", self.replicas)


@dataclass(kw_only=True, slots=True)
class WandbConfig:
    """A Weights & Biases run fed with the TensorBoard series (needs the [wandb] extra)."""

    mode: Literal["online", "offline", "disabled"] = "disabled"  # offline: files under out_dir/wandb
    project: str | None = None  # null: W&B's default project
    entity: str | None = None  # W&B entity (null: your default)
    name: str | None = None  # null: the name of out_dir
    group: str | None = None  # W&B group
    tags: list[str] = field(default_factory=list)  # W&B tags


@dataclass(kw_only=True, slots=True)
class LogConfig:
    """What is written to metrics.jsonl and shown while training."""

    every_steps: int = 50  # training-step averages per module (1 = every step)
    live: Literal["auto", "rich", "plain", "off"] = "auto"  # auto: rich on a terminal
    live_interval_s: float | None = None  # null: 2 s for the rich view, 30 s for plain blocks
    # TensorBoard event files under out_dir/tensorboard, keyed by each module's step ([tensorboard] extra)
    tensorboard: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # each rank's spans (compute, waits, evaluation, checkpoint) for python -m trgl_pipe.timeline
    timeline: bool = True

    def __post_init__(self) -> None:
        _positive("log.every_steps", self.every_steps)
        if self.live_interval_s is not None:
            _positive("log.live_interval_s", self.live_interval_s)


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """When each module's shard is written and how many checkpoints are kept."""

    every_epochs: int = 1  # 0: never at epoch ends
    every_steps: int = 0  # 0: never mid-epoch
    keep: int = 2  # complete checkpoints kept (older ones are deleted)

    def __post_init__(self) -> None:
        _non_negative("checkpoint.every_epochs", self.every_epochs)
        _non_negative("checkpoint.every_steps", self.every_steps)
        _positive("checkpoint.keep", self.keep)


@dataclass(kw_only=True, slots=True)
class DebugConfig:
    """Fault injection and tracing, to test failure handling and the buffer bound."""

    raise_at_step: int | None = None  # module `raise_on_module` raises at this training step
    raise_on_module: int = 0  # the module raise_at_step and nan_at_step act on
    nan_at_step: int | None = None  # module `raise_on_module`'s weights turn NaN before this step
    slow_module: int | None = None  # this module sleeps `slow_s` seconds in every training step
    slow_s: float = 0.0  # the sleep of slow_module per training step
    slow_eval_s: float = 0.0  # ... and `slow_eval_s` seconds in every evaluation step
    trace: bool = False  # write each send and each consumed message, with times, to trace.jsonl
    # [a, b]: torch.profiler on every rank for training steps a..b of its first module
    profile_steps: list[int] | None = None
    hide_out_dir_from_rank: int | None = None  # this rank reads out_dir as another node's folder would

    def __post_init__(self) -> None:
        _non_negative("debug.raise_on_module", self.raise_on_module)
        _non_negative("debug.slow_s", self.slow_s)
        _non_negative("debug.slow_eval_s", self.slow_eval_s)
        if self.raise_at_step is not None:
            _positive("debug.raise_at_step", self.raise_at_step)
        if self.nan_at_step is not None:
            _positive("debug.nan_at_step", self.nan_at_step)
        steps = self.profile_steps
        if steps is not None and (len(steps) != 2 or not 1 <= steps[0] <= steps[1]):
            raise ConfigError(
                "debug.profile_steps must be [first, last] training steps with 1 <= first <= last, "
                f"got {steps}"
            )


@dataclass(kw_only=True, slots=True)
class Config:
    """The whole run. Sections are validated on their own, cross-section rules here."""

    seed: int = 0  # the data subset, the initial weights and the batch order
    out_dir: str = "runs/default"  # the run folder (shared by every rank of a pipeline)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the rank's GPU if any, else the CPU
    resume: str | None = None  # auto: newest complete checkpoint in out_dir; or a path
    overwrite: bool = False  # allow a fresh run into an out_dir that holds an earlier run
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    aux: AuxConfig = field(default_factory=AuxConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trgl: TrglConfig = field(default_factory=TrglConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def __post_init__(self) -> None:
        if self.resume is not None and self.overwrite:
            raise ConfigError("resume and overwrite=true contradict each other; choose one")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be in [0, 2**63), got {self.seed}")
        k = self.num_modules
        d = self.debug
        if (d.raise_at_step is not None or d.nan_at_step is not None) and d.raise_on_module >= k:
            raise ConfigError(
                f"debug.raise_on_module={d.raise_on_module} names no module: the run has {k} (0..{k - 1})"
            )
        if d.slow_module is not None and not 0 <= d.slow_module < k:
            raise ConfigError(
                f"debug.slow_module={d.slow_module} names no module: the run has {k} (0..{k - 1})"
            )
        # what goes with what (regime, objective, network, layout): one place, read last
        from trgl_pipe.compatibility import check

        check(self)

    @property
    def num_modules(self) -> int:
        """K as trained: end-to-end training is one module holding every block."""
        return 1 if self.train.regime == "e2e" else self.model.num_modules

    def to_dict(self) -> dict[str, Any]:
        """Every key, as config.yaml holds it (the deprecated objective keys are moved already)."""
        raw = dataclasses.asdict(self)
        for old in DEPRECATED_OBJECTIVE_KEYS:
            del raw["objective"][old]
        return raw


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (optional), apply the overrides in order, validate everything.

    An override is ``section.key=value`` or the path of a YAML file (``.yaml``/``.yml``, no ``=``)
    whose keys replace those given before it, section by section: what ``python -m trgl_pipe.search``
    writes is such a file."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml_mapping(Path(path))
    for item in overrides:
        if is_override_file(item):
            merge_sections(raw, read_yaml_mapping(Path(item)), item)
        else:
            apply_override(raw, item)
    cfg = from_dict(Config, raw, "")
    from trgl_pipe.compatibility import warn_unused

    warn_unused(cfg, raw)
    return cfg


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, mark: Any) -> None:
        super().__init__(f"key {key!r} appears twice")
        self.key, self.problem_mark = key, mark


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one,
    so the first value would be ignored without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Parse a YAML file that must hold a mapping, with one-line errors."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {error.start}); save it as UTF-8"
        ) from error
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: no arbitrary objects
    except _DuplicateKey as error:
        raise ConfigError(
            f"config file {path} gives key {error.key!r} twice in one section (line "
            f"{error.problem_mark.line + 1}); keep one"
        ) from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from error
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(raw).__name__}")
    return raw


def is_override_file(item: str) -> bool:
    """An override that names a YAML file rather than setting one key."""
    return "=" not in item and item.endswith((".yaml", ".yml"))


def merge_sections(raw: dict[str, Any], extra: dict[str, Any], source: str) -> None:
    """Lay the keys of ``extra`` (an override file) over ``raw``: a section's keys one by one, a
    top-level key (``seed``) whole."""
    for key, value in extra.items():
        if isinstance(value, dict):
            section = raw.setdefault(key, {})
            if not isinstance(section, dict):
                raise ConfigError(f"override file {source}: {key} is not a section")
            section.update(value)
        else:
            raw[key] = value


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``section.key=value`` in a raw config mapping; the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.epochs=5)")
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {item!r}: the value is not valid YAML") from error
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and type."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in raw if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; the keys of {where} are: {', '.join(names)}"
        )
    kwargs = {name: _coerce(raw[name], hints[name], f"{prefix}{name}") for name in names if name in raw}
    return cls(**kwargs)


class _OutOfRange(ConfigError):
    """A value of the right type that no value of that type may take here."""


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a type hint; return it (ints widened to float where a float is due)."""
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, {} if value is None else value, f"{key}.")
    if hint is Any:
        return value
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in get_args(hint):
            try:
                return _coerce(value, option, key)
            except _OutOfRange:
                raise  # the value has the option's type: its own message says what is wrong
            except ConfigError:
                continue
        raise ConfigError(f"{key} must be {_describe_hint(hint)}, got {_describe(value)}")
    if origin is Literal:
        allowed = get_args(hint)
        if isinstance(value, bool) and isinstance(allowed[0], str):
            # YAML 1.1 reads off/on/no/yes as booleans; map them back to the words allowed here
            words = ("on", "yes", "true") if value else ("off", "no", "false")
            value = next((w for w in words if w in allowed), value)
        if value in allowed and type(value) is type(allowed[0]):
            return value
        raise ConfigError(f"{key} must be one of {' | '.join(map(str, allowed))}, got {_describe(value)}")
    if origin is dict:
        _, value_hint = get_args(hint)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key} must be a mapping of names to values, got {_describe(value)}")
        return {k: _coerce(v, value_hint, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item_hint,) = get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be {_describe_hint(hint)}, got {_describe(value)}")
        return [_coerce(item, item_hint, f"{key}[{i}]") for i, item in enumerate(value)]
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key} must be null, got {_describe(value)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= 2**63:  # torch and numpy take 64-bit integers
                raise _OutOfRange(f"{key}={value} is too large for a 64-bit integer")
            return value
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 else math.inf
        elif isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None:
            if not math.isfinite(number):
                raise _OutOfRange(f"{key} must be a finite number, got {_describe(value)}")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a hint this loader does not know is a bug here, not user input
        raise TypeError(f"config loader cannot check type {hint!r} of {key}")
    raise ConfigError(f"{key} must be {_describe_hint(hint)}, got {_describe(value)}")


def _describe_hint(hint: Any) -> str:
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe_hint(h) for h in get_args(hint))
    if origin is Literal:
        return "one of " + " | ".join(map(str, get_args(hint)))
    if origin is list:
        plural = {int: "integers", float: "numbers", str: "strings", bool: "true or false values"}
        item = get_args(hint)[0]
        return f"a list of {plural.get(item, _describe_hint(item))}"
    if origin is dict:
        return "a mapping"
    if hint is type(None):
        return "null"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _import_path(key: str, value: str, builtins: tuple[str, ...]) -> None:
    """A value that is not a built-in name must look like ``pkg.mod:callable``."""
    module, sep, name = value.partition(":")
    if not sep or not module or not name or not all(p.isidentifier() for p in module.split(".")):
        known = f"one of {' | '.join(builtins)}, or " if builtins else ""
        example = "my_pkg.data:build" if key.startswith("data.") else "my_pkg.nets:build"
        raise ConfigError(f"{key} must be {known}an import path like {example}, got {value!r}")


def _positive(key: str, value: float, minimum: float = 1) -> None:
    if isinstance(value, int) and value < minimum:
        raise ConfigError(f"{key} must be at least {minimum}, got {value}")
    if isinstance(value, float) and not value > 0:
        raise ConfigError(f"{key} must be greater than 0, got {value}")


def _non_negative(key: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{key} must be 0 or more, got {value}")


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config as YAML (atomically, so a crash never leaves half a file)."""
    from trgl_pipe.errors import OutputError
    from trgl_pipe.io import atomic_write_text

    try:
        atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
    except OSError as error:
        raise OutputError(path, error) from error
