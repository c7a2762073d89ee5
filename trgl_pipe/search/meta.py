"""The meta-gradient of SEDONA's search: how the cut and head weights (α, β) change the network a
few SGD steps later, through ``torch.func`` (``functional_call`` and nested ``grad``).

Two objectives (``objective``):

- ``valid`` (the paper's, the default): the loss of the network's own output on a held-out
  batch after ``n`` unrolled steps of the relaxed training. It asks the question the search is
  for: which cuts and heads leave the whole network best on data it did not train on.
- ``train`` (the authors' code): the relaxed training loss of the n-th step (the nested mix
  a_cut(0)·L_0 + a_pass(0)·(…), before that step's update; n − 1 steps are unrolled). It
  depends on α directly as well as through the unrolled steps, so it also rewards whichever
  weighting makes that mix small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad

from trgl_pipe.search.relaxed import RelaxedNetwork

Params = dict[str, Tensor]
Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class InnerSGD:
    """The unrolled steps' SGD (torch's: decay added to the gradient, then momentum)."""

    lr: float
    momentum: float
    weight_decay: float


def gate_weights(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(cut, passing, mix): softmax over each gap's two choices and over its head depths."""
    a = torch.softmax(alpha, dim=1)
    return a[:, 0], a[:, 1], torch.softmax(beta, dim=1)


def relaxed_loss(net: RelaxedNetwork, params: Params, alpha: Tensor, beta: Tensor, batch: Batch) -> Tensor:
    """SEDONA's nested mix a_cut(0)·L_0 + a_pass(0)·(a_cut(1)·L_1 + a_pass(1)·(… L_own)) (its
    gradient, divided by :meth:`RelaxedNetwork.gradient_scales`, trains the relaxed network)."""
    x, y = batch
    cut, passing, mix = gate_weights(alpha, beta)
    losses, logits = functional_call(net, params, (x, y, mix))
    loss = F.cross_entropy(logits, y)
    for i in range(len(losses) - 1, -1, -1):
        loss = passing[i] * loss + cut[i] * losses[i]
    return loss


def relaxed_gradient(
    net: RelaxedNetwork, params: Params, alpha: Tensor, beta: Tensor, batch: Batch
) -> Params:
    """The relaxed training step's gradient: the nested mix's, divided per block and head."""
    g = grad(relaxed_loss, argnums=1)(net, params, alpha, beta, batch)
    cut, passing, _ = gate_weights(alpha, beta)
    scales = net.gradient_scales(cut, passing)
    return {k: g[k] * scales[k] for k in g}


def own_loss(net: RelaxedNetwork, params: Params, batch: Batch) -> Tensor:
    """The cross-entropy of the network's own output (the paper's validation objective)."""
    x, y = batch
    _, logits = functional_call(net, params, (x, y, None))
    return F.cross_entropy(logits, y)


@dataclass(frozen=True)
class Lookahead:
    """The meta-objective's fixed parts: the network, its weights and momentum buffers now, the
    batches of the unrolled steps, the held-out batch, the inner SGD and which objective."""

    net: RelaxedNetwork
    params: Params
    momenta: Params
    steps: Sequence[Batch]
    valid: Batch
    sgd: InnerSGD
    objective: str = "valid"

    def value(self, alpha: Tensor, beta: Tensor) -> Tensor:
        """The meta-objective as a function of (α, β): ``len(steps)`` relaxed SGD steps from
        ``params`` (with its momentum buffers), then the objective (see the module)."""
        net, sgd = self.net, self.sgd
        p, m = self.params, self.momenta
        for t, batch in enumerate(self.steps):
            if self.objective == "train" and t == len(self.steps) - 1:
                return relaxed_loss(net, p, alpha, beta, batch)
            g = relaxed_gradient(net, p, alpha, beta, batch)
            m = {k: sgd.momentum * m[k] + g[k] + sgd.weight_decay * p[k] for k in p}
            p = {k: p[k] - sgd.lr * m[k] for k in p}
        return own_loss(net, p, self.valid)

    def gradient(self, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(∂J/∂α, ∂J/∂β, J) of :meth:`value`, the weights held constant."""
        fixed = Lookahead(
            self.net,
            {k: v.detach() for k, v in self.params.items()},
            {k: v.detach() for k, v in self.momenta.items()},
            self.steps,
            self.valid,
            self.sgd,
            self.objective,
        )

        def with_value(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
            value = fixed.value(a, b)
            return value, value.detach()

        (g_alpha, g_beta), value = grad(with_value, argnums=(0, 1), has_aux=True)(
            alpha.detach(), beta.detach()
        )
        return g_alpha, g_beta, value
