"""The interface every local objective offers a stage.

An objective is built for one module from a :class:`ModuleSpec` (its index, the shapes of its input,
output and the batch's image). It may own auxiliary networks besides the classifier F_k (a decoder,
a projection head); the stage trains them with the module and runs them inside the module's
forward, so data-parallel replicas average their gradients too. Each training step the stage hands
the objective a :class:`LocalInputs` and backpropagates the scalar it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn


@dataclass(frozen=True, slots=True)
class ModuleSpec:
    """What an objective may know about module ``index`` of ``num_modules`` (shapes of one sample)."""

    index: int
    num_modules: int
    in_shape: tuple[int, ...]  # the module's input (the image for module 0)
    out_shape: tuple[int, ...]  # the module's output, [C, H, W] (or [H, W, C] for token maps)
    image_shape: tuple[int, ...]  # the batch's input image, [C, H, W]
    num_classes: int
    tokens: bool = False  # outputs are [N, H, W, C] token maps (Swin)
    mean: tuple[float, ...] = ()  # per-channel normalisation of the images (empty: none)
    std: tuple[float, ...] = ()
    device: str = "cpu"  # where the module trains: state an objective keeps (λ) can live there
    last_block: int = 0  # the network's block the module ends before (seeds its networks)
    later_shapes: tuple[tuple[int, ...], ...] = ()  # the output of every block after the module
    # the network's block right after the module (module k+1's first), as built, with its initial
    # weights: an objective copies its architecture (MAN); never train it in place
    next_block: nn.Module | None = None

    @property
    def is_last(self) -> bool:
        return self.index == self.num_modules - 1


@dataclass(slots=True)
class LocalInputs:
    """What one training step of a module gives its objective."""

    x: Tensor  # the module's input (detached: no gradient crosses modules)
    out: Tensor  # T_k(x)
    kinetic: Tensor  # C_k: the reduced kinetic energy of the module's residual branches
    logits: Tensor  # F_k(T_k(x))
    ce: Tensor  # the cross-entropy of ``logits`` (what the logs call ce)
    y: Tensor
    image: Tensor | None = None  # the batch's input image, when the objective asked for it
    extras: dict[str, Tensor] = field(default_factory=dict)  # what ``forward`` computed


def _identity(t: Tensor) -> Tensor:
    return t


class Objective:
    """A local objective: by default plain cross-entropy through F_k (VanGL).

    It is built for each module as ``Class(spec, **objective.kwargs)`` (the built-ins too: see
    :data:`trgl_pipe.objectives.BUILT_IN`). Class attributes say what the stage must provide:
    ``needs_image`` (the batch's image must reach this module; :meth:`reads_image` refines it per
    module), ``uses_kinetic`` (C_k enters the loss: keep the residuals for autograd),
    ``probe_head`` (F_k trains on the detached output, so it only measures accuracy), where it
    can train, ``regimes`` (a local objective trains each module on its own loss: parallel,
    sequential, multi-lap, the pipeline, and, as one module, end to end; the delayed-gradient
    regimes ddg and fr need the end-to-end loss itself, which only TRGL's objective with the term
    off computes), ``needs_from_next``: what it needs from module k+1: ``"weights"`` (module
    k+1 sends its first block's parameters back every ``weights_every`` steps, in every transport:
    :meth:`weights_for_previous`, :meth:`take_next_weights`; MAN) or ``"gradient"`` (module k+1
    sends the gradient of its :meth:`loss_for_previous` with respect to its input, module k's
    output; module k adds it, backpropagated through its body, to its next step's update: HPFF),
    and ``feeds_head``: :meth:`forward` returns what F_k reads
    as ``extras["head_input"]`` instead of the module's output (MAN's F_k reads LB(h) + EMA(h)).
    :func:`trgl_pipe.compatibility.check` reads these declarations before anything is built.
    """

    name = "vangl"
    label = "VanGL"  # for tables; describe() may refine it with the method's settings
    needs_image: bool = False
    uses_kinetic: bool = False
    probe_head: bool = False
    regimes: ClassVar[tuple[str, ...]] = ("e2e", "parallel", "sequential", "multilap")
    needs_from_next: ClassVar[tuple[str, ...]] = ()
    needs_feature_maps: ClassVar[bool] = False  # [C, H, W] outputs: token maps (Swin) are refused
    feeds_head: ClassVar[bool] = False
    weights_every: int = 0  # needs_from_next "weights": every how many steps module k+1 sends them

    @classmethod
    def reads_image(cls, index: int, num_modules: int) -> bool:
        """Whether module ``index`` of ``num_modules`` reads the batch's image (read before any
        module is built, so the ranks before it know to pass the image on)."""
        return cls.needs_image

    @classmethod
    def check_kwargs(cls, kwargs: dict[str, Any], num_modules: int) -> None:
        """Raise :class:`trgl_pipe.ConfigError` for a bad value in ``objective.kwargs`` (or one that
        does not fit ``num_modules``, K): called with the config, before anything is built or
        written, by ``--print-config`` too. Unknown names are refused already."""

    def __init__(self, spec: ModuleSpec | None = None) -> None:
        """``spec`` kept as ``self.spec``: an objective with no settings needs no ``__init__``."""
        if spec is not None:
            self.spec = spec
        # data-parallel replicas average what must stay equal on all of them (λ's CE)
        self.average: Callable[[Tensor], Tensor] = _identity

    def head(self) -> nn.Module | None:
        """A classifier F_k of the method's own (None: the one the ``aux`` section builds)."""
        return None

    def networks(self) -> nn.ModuleDict:
        """The auxiliary networks besides F_k, built once, trained with the module."""
        return nn.ModuleDict()

    def forward(self, nets: nn.ModuleDict, x: Tensor, out: Tensor, image: Tensor | None) -> dict[str, Tensor]:
        """Run the auxiliary networks on the module's output (inside the module's forward)."""
        return {}

    def weights_for_previous(self, first_block: nn.Module) -> list[Tensor]:
        """Module k+1's side of ``needs_from_next = ("weights",)``: what it sends module k from its
        first block, by default the block's parameters in their order (module k calls it on its
        ``spec.next_block`` to learn the shapes)."""
        return [p.detach() for p in first_block.parameters()]

    def take_next_weights(self, nets: nn.ModuleDict, weights: list[Tensor], steps: int) -> None:
        """Module k's side: ``weights`` are what module k+1 sent after its update t - N, arriving at
        module k's step t (t a multiple of N = ``weights_every``); ``steps`` is N."""
        raise NotImplementedError(f"{type(self).__name__} needs weights from the next module")

    def loss_for_previous(self, inputs: LocalInputs) -> Tensor | None:
        """``needs_from_next = ("gradient",)``: the part of this module's loss whose gradient with
        respect to its input goes back to the module before (None: none; module 0 sends nothing)."""
        return None

    def loss(self, inputs: LocalInputs) -> Tensor:
        """The scalar to backpropagate at this training step."""
        return inputs.ce

    def describe(self) -> dict[str, Any]:
        """τ / λ (None when the method has none), the method's name and its label (for tables),
        for logs, the summary and the report."""
        return {"tau": None, "lambda": None, "method": self.name, "label": self.label}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
