"""InfoPro (Wang et al., ICLR 2021) and InfoProL, the variant the TRGL paper compares on Swin.

InfoPro, module k < K-1:  L_k = λ1_k · BCE(D_k(h), image in [0, 1]) + λ2_k · task(h, y)
    D_k: h upsampled (bilinear) to the image's size → 3×3 conv → BN → ReLU → 3×3 conv → sigmoid.
    task: "softmax", cross-entropy through a projection head (3×3 conv → BN → ReLU → pool →
    linear → ReLU → linear), which is then F_k; or "contrast", the supervised contrastive loss
    of the projection head's normalised embedding (F_k then trains on the detached output, only
    to measure the module's accuracy).
    (λ1_k, λ2_k) move linearly from the first module's pair to module K-2's pair.
InfoProL: the decoder reconstructs the module's input (the previous module's output; the image
    for module 0) with a mean squared error, so the image need not travel down the pipeline.
The last module trains on plain cross-entropy through the network's own head.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trgl_pipe.errors import ConfigError
from trgl_pipe.objectives.base import LocalInputs, ModuleSpec, Objective

# The authors' ResNet-110 CIFAR-10 commands: [λ1, λ2] of the first module, then of module K-2
AUTHORS_WEIGHTS = {
    2: [5.0, 0.5, 0.0, 0.0],
    4: [1.0, 0.0, 0.0, 1.0],
    8: [5.0, 0.0, 0.0, 1.0],
    16: [5.0, 0.0, 0.5, 1.0],
}
BASE_TEMPERATURE = 0.07  # the supervised contrastive loss's fixed scale (loss × τ / 0.07)
SMALLEST_DOWNSAMPLED = 8  # the projection head keeps maps of this side or less at their size


def to_map(t: Tensor, tokens: bool) -> Tensor:
    """[N, C, H, W] from a token map [N, H, W, C]; a feature map as it is."""
    return t.permute(0, 3, 1, 2) if tokens else t


def channels_and_side(shape: tuple[int, ...], tokens: bool) -> tuple[int, tuple[int, int]]:
    """(channels, (height, width)) of one sample of a feature or token map."""
    if tokens:
        return shape[2], (shape[0], shape[1])
    return shape[0], (shape[1], shape[2])


def module_weights(weights: list[float], index: int, num_modules: int) -> tuple[float, float]:
    """(λ1, λ2) of module ``index``: linear from the first module's pair to module K-2's."""
    ratio = index / (num_modules - 2) if num_modules > 2 else 0.0
    return (
        weights[0] * (1 - ratio) + weights[2] * ratio,
        weights[1] * (1 - ratio) + weights[3] * ratio,
    )


class ImageTarget:
    """The batch's image restored to [0, 1] with the data's per-channel mean and std: what the
    reconstruction terms (InfoPro, MAN, HPFF) decode against."""

    def __init__(self, spec: ModuleSpec) -> None:
        channels = spec.image_shape[0]
        view = (1, -1, 1, 1)
        self.mean = torch.tensor(spec.mean or [0.0] * channels).view(view)
        self.std = torch.tensor(spec.std or [1.0] * channels).view(view)
        self.module = spec.index

    def __call__(self, image: Tensor | None) -> Tensor:
        if image is None:
            raise RuntimeError(f"module {self.module}: the objective needs the batch's image")
        mean, std = self.mean.to(image.device), self.std.to(image.device)
        return (image.float() * std + mean).clamp(0, 1)


def check_head_kwargs(kwargs: dict[str, Any], keys: tuple[str, ...] = ("widen", "feature_dim")) -> None:
    """The decoder's and projection head's settings: numbers above 0, ``feature_dim`` whole."""
    for key in keys:
        value = kwargs.get(key, 1)
        if not is_number(value) or value <= 0:
            raise ConfigError(f"objective.kwargs.{key} must be a number above 0, got {value!r}")
    if not isinstance(kwargs.get("feature_dim", 1), int):
        raise ConfigError(
            f"objective.kwargs.feature_dim must be a whole number, got {kwargs['feature_dim']!r}"
        )


def check_loss_weights(weights: Any, counts: tuple[int, ...] = (4,)) -> None:
    """``objective.kwargs.weights``: None, or a list of ``counts`` numbers, 0 or more: [λ1, λ2]
    for every module (2) or at module 0 then at module K-2 (4)."""
    valid = isinstance(weights, list) and len(weights) in counts
    if weights is not None and not (valid and all(is_number(w) and w >= 0 for w in weights)):
        every = "2 numbers, [reconstruction, task] for every module, or " if 2 in counts else ""
        raise ConfigError(
            f"objective.kwargs.weights={weights}: give {every}4 numbers, 0 or more: [reconstruction, "
            "task] at module 0, then at module K-2"
        )


def require_feature_maps(spec: ModuleSpec, name: str, why: str) -> None:
    """Refuse a network whose modules output token maps or vectors (one line)."""
    if spec.tokens or len(spec.out_shape) != 3:
        raise ConfigError(
            f"objective.name={name} {why}; the network's modules output token maps or vectors: use a CNN "
            "backbone, or another objective"
        )


class Decoder(nn.Module):
    """Upsample h to ``size``, then 3×3 conv → BN → ReLU → 3×3 conv (→ sigmoid for images)."""

    def __init__(
        self, in_channels: int, out_channels: int, size: tuple[int, int], widen: float, sigmoid: bool
    ) -> None:
        super().__init__()
        hidden = int(12 * widen)
        self.size = size
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 3, padding=1),
        ]
        if sigmoid:
            layers.append(nn.Sigmoid())
        self.net = nn.Sequential(*layers)

    def forward(self, h: Tensor) -> Tensor:
        h = F.interpolate(h, size=list(self.size), mode="bilinear", align_corners=True)
        return self.net(h)


class ProjectionHead(nn.Module):
    """3×3 conv (stride 2 and twice the channels while the map is larger than 8×8) → BN → ReLU →
    global average pool → linear → ReLU → linear: the authors' "1c2f" auxiliary network; with
    ``convs=2`` a second 3×3 conv → BN → ReLU at the new width first ("2c2f", MAN's default)."""

    def __init__(
        self,
        in_channels: int,
        side: tuple[int, int],
        out_features: int,
        feature_dim: int,
        widen: float,
        tokens: bool,
        convs: int = 1,
    ) -> None:
        super().__init__()
        downsample = max(side) > SMALLEST_DOWNSAMPLED
        conv_channels = int((2 * in_channels if downsample else in_channels) * widen)
        hidden = int(feature_dim * widen)
        self.tokens = tokens
        second: list[nn.Module] = []
        if convs == 2:
            second = [
                nn.Conv2d(conv_channels, conv_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(conv_channels),
                nn.ReLU(),
            ]
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, conv_channels, 3, stride=2 if downsample else 1, padding=1, bias=False),
            nn.BatchNorm2d(conv_channels),
            nn.ReLU(),
            *second,
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(conv_channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_features),
        )

    def forward(self, h: Tensor) -> Tensor:
        return self.net(to_map(h, self.tokens))


def supervised_contrastive(embedding: Tensor, y: Tensor, temperature: float) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) of one view: for each anchor i, minus the
    mean over its positives p ≠ i of log softmax_{j ≠ i}(z_i·z_j / τ)_p, times τ / 0.07, averaged
    over anchors (an anchor without positives counts 0). ``embedding`` rows are unit vectors."""
    n = embedding.shape[0]
    logits = embedding @ embedding.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = ~torch.eye(n, dtype=torch.bool, device=embedding.device)
    positive = (y[:, None] == y[None, :]) & not_self
    denominator = (logits.exp() * not_self).sum(1, keepdim=True)
    log_prob = logits - denominator.log()
    count = positive.sum(1).clamp(min=1)
    mean_log_prob = (log_prob * positive).sum(1) / count
    return -(temperature / BASE_TEMPERATURE) * mean_log_prob.mean()


def _check_authors_weights(num_modules: int) -> None:
    if num_modules not in AUTHORS_WEIGHTS:
        raise ConfigError(
            f"objective.kwargs.weights: the authors give weights for K in {sorted(AUTHORS_WEIGHTS)} "
            f"only, not K={num_modules}; set objective.kwargs.weights=[λ1, λ2, λ1', λ2']"
        )


class InfoProObjective(Objective):
    """InfoPro for one module; :class:`InfoProLObjective` reconstructs the module's input instead.

    ``objective.kwargs``: ``loss`` (the task term, softmax or contrast), ``weights``
    ([λ1, λ2] of the first module, then of module K-2; None: the authors' ResNet-110 CIFAR-10
    values for K = 2, 4, 8, 16), ``widen`` (width factor of the decoder and the projection head),
    ``feature_dim`` (the projection head's hidden width, contrast's embedding), ``temperature``.
    """

    name = "infopro"
    label = "InfoPro"
    reconstruct = "image"
    needs_image = True

    def __init__(
        self,
        spec: ModuleSpec,
        loss: str = "softmax",
        weights: list[float] | None = None,
        widen: float = 1.0,
        feature_dim: int = 128,
        temperature: float = 0.07,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.task = loss
        self.widen = widen
        self.feature_dim = feature_dim
        self.temperature = temperature
        self.active = not spec.is_last  # the last module: plain CE through the network's head
        if weights is None and self.active:
            _check_authors_weights(spec.num_modules)
            weights = AUTHORS_WEIGHTS[spec.num_modules]
        self.weights = module_weights(weights, spec.index, spec.num_modules) if self.active else (0.0, 1.0)
        self.needs_image = self.reads_image(spec.index, spec.num_modules)
        self.probe_head = self.active and self.task == "contrast"
        self.image_channels, _ = channels_and_side(spec.image_shape, False)
        self.image_target = ImageTarget(spec)

    @classmethod
    def reads_image(cls, index: int, num_modules: int) -> bool:
        return cls.reconstruct == "image" and index < num_modules - 1

    @classmethod
    def check_kwargs(cls, kwargs: dict[str, Any], num_modules: int) -> None:
        loss = kwargs.get("loss", "softmax")
        if loss not in ("softmax", "contrast"):
            raise ConfigError(f"objective.kwargs.loss={loss} is not InfoPro's; choose softmax or contrast")
        weights = kwargs.get("weights")
        if weights is not None and (
            not isinstance(weights, list) or len(weights) != 4 or not all(is_number(w) for w in weights)
        ):
            raise ConfigError(
                f"objective.kwargs.weights={weights}: give 4 numbers, [reconstruction, task] at the "
                "first module, then at module K-2 (or null for the authors' values)"
            )
        if weights is not None and any(w < 0 for w in weights):
            raise ConfigError(f"objective.kwargs.weights must be 0 or more, got {weights}")
        check_head_kwargs(kwargs, ("widen", "feature_dim", "temperature"))
        if kwargs.get("weights") is None and num_modules > 1:
            _check_authors_weights(num_modules)

    def _projection(self, out_features: int) -> ProjectionHead:
        channels, side = channels_and_side(self.spec.out_shape, self.spec.tokens)
        return ProjectionHead(channels, side, out_features, self.feature_dim, self.widen, self.spec.tokens)

    def head(self) -> nn.Module | None:
        """F_k of the softmax task: the projection head, to the classes."""
        if self.active and self.task == "softmax":
            return self._projection(self.spec.num_classes)
        return None

    def networks(self) -> nn.ModuleDict:
        if not self.active:
            return nn.ModuleDict()
        channels, _ = channels_and_side(self.spec.out_shape, self.spec.tokens)
        if self.reconstruct == "image":
            target_channels, size = channels_and_side(self.spec.image_shape, False)
        else:
            target_channels, size = channels_and_side(
                self.spec.in_shape, self.spec.tokens and self.spec.index > 0
            )
        nets = nn.ModuleDict(
            {"decoder": Decoder(channels, target_channels, size, self.widen, self.reconstruct == "image")}
        )
        if self.task == "contrast":
            nets["projection"] = self._projection(self.feature_dim)
        return nets

    def forward(self, nets: nn.ModuleDict, x: Tensor, out: Tensor, image: Tensor | None) -> dict[str, Tensor]:
        if not self.active:
            return {}
        extras = {"reconstruction": nets["decoder"](to_map(out, self.spec.tokens))}
        if "projection" in nets:
            extras["embedding"] = F.normalize(nets["projection"](out), dim=1)
        return extras

    def target(self, x: Tensor, image: Tensor | None) -> Tensor:
        """What the decoder reconstructs: the image in [0, 1], or the module's input."""
        if self.reconstruct == "image":
            return self.image_target(image)
        return to_map(x, self.spec.tokens and self.spec.index > 0).detach().float()

    def loss(self, inputs: LocalInputs) -> Tensor:
        if not self.active:
            return inputs.ce
        recon_weight, task_weight = self.weights
        reconstruction = inputs.extras["reconstruction"].float()
        target = self.target(inputs.x, inputs.image)
        if self.reconstruct == "image":
            recon = F.binary_cross_entropy(reconstruction, target)
        else:
            recon = F.mse_loss(reconstruction, target)
        if self.task == "softmax":
            return recon_weight * recon + task_weight * inputs.ce
        contrast = supervised_contrastive(inputs.extras["embedding"].float(), inputs.y, self.temperature)
        return recon_weight * recon + task_weight * contrast + inputs.ce  # + the probe's CE

    def describe(self) -> dict[str, Any]:
        label = f"{self.label} ({self.task})" if self.reconstruct == "image" else self.label
        return {"tau": None, "lambda": None, "method": self.name, "label": label}


class InfoProLObjective(InfoProObjective):
    """InfoProL: the decoder reconstructs the module's input, so the image need not travel."""

    name = "infopro_l"
    label = "InfoProL"
    reconstruct = "input"
    needs_image = False


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)
