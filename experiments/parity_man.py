"""MAN's local loss and its average against the authors' code, on identical weights and inputs.

    python experiments/parity_man.py AUTHORS_CHECKOUT      # a clone of JunhaoSu0/MAN

Their CIFAR ResNet-32 with K = 16 (their only CIFAR command: 15 modules, 14 with a MAN path) is
built on the CPU (their ``.cuda()`` calls are made no-ops for the run). For every module k < K-1:
a batch goes through their stem and modules 0..k; trgl_pipe's ``ManObjective`` for that module
runs *their* LB[k] and EMA_Net[k] blocks (``nets["learnable"].block``, ``nets["ema"].block``)
with their decoder's and auxiliary classifier's weights copied into its own (same layers, same
order), with their λ for that module (their stage-based ratio). Compared, bit for bit: y = LB(h) +
EMA(h), the loss, and its gradient with respect to h; then one step of the average (theirs: their
loop's line; ours: ``take_next_weights`` with N = 1) from the same EMA toward the same block.
Their code is imported from the checkout given, never copied here; it has no licence.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from parity_common import MEAN, STD, cifar_batch, cpu_only, report  # noqa: E402

from trgl_pipe.objectives.base import LocalInputs, ModuleSpec  # noqa: E402
from trgl_pipe.objectives.man import ManObjective  # noqa: E402

IXX, IXY = (5.0, 0.5), (0.0, 0.0)  # their README command's --ixx_1 --ixy_1, --ixx_2 --ixy_2


def _their_model(checkout: Path, batch: int) -> torch.nn.Module:
    sys.path.insert(0, str(checkout / "Exp on CIFAR-SVHN-STL"))
    cpu_only()
    module = importlib.import_module("networks.resnetInfoPro_MAN")
    return module.resnet32(  # type: ignore[attr-defined]
        local_module_num=16,
        batch_size=batch,
        image_size=32,
        dataset="cifar10",
        class_num=10,
        aux_net_config="2c2f",
        local_loss_mode="cross_entropy",
        aux_net_widen=1,
        aux_net_feature_dim=128,
        momentum=0.995,
    )


def _next_position(model: torch.nn.Module, k: int) -> tuple[int, int]:
    stage, index = model.infopro_config[k]
    return (stage + 1, 0) if index == len(model.layer1) - 1 else (stage, index + 1)


def compare(model: torch.nn.Module, k: int, image: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """The largest differences for module ``k`` (all must be 0)."""
    with torch.no_grad():
        h = model.relu(model.bn1(model.conv1(image)))
        for i in range(k + 1):
            h = model.Encoder_Net[i](h)
    h = h.detach().requires_grad_()
    stage, index = _next_position(model, k)
    block = getattr(model, f"layer{stage}")[index]
    decoder = getattr(model, f"decoder_{stage}_{index}")
    classifier = getattr(model, f"aux_classifier_{stage}_{index}")
    ratio = stage / (model.local_module_num - 2)
    weights = [IXX[0] * (1 - ratio) + IXX[1] * ratio, IXY[0] * (1 - ratio) + IXY[1] * ratio]

    y_theirs = model.LB[k](h) + model.EMA_Net[k](h)
    loss_theirs = weights[0] * decoder(y_theirs, model._image_restore(image)) + weights[1] * classifier(
        y_theirs, target
    )
    (grad_theirs,) = torch.autograd.grad(loss_theirs, h)

    spec = ModuleSpec(
        index=k,
        num_modules=model.local_module_num,
        in_shape=tuple(h.shape[1:]),
        out_shape=tuple(h.shape[1:]),
        image_shape=(3, 32, 32),
        num_classes=10,
        mean=MEAN,
        std=STD,
        later_shapes=(tuple(y_theirs.shape[1:]),),
        next_block=block,
    )
    ours = ManObjective(spec, weights=weights)
    nets, head = ours.networks(), ours.head()
    nets["learnable"].block, nets["ema"].block = model.LB[k], model.EMA_Net[k]
    nets["decoder"].net.load_state_dict(decoder.decoder.state_dict())
    head.net.load_state_dict(classifier.head.state_dict())
    nets.train()
    head.train()
    extras = ours.forward(nets, h, h, image)
    logits = head(extras["head_input"])
    ce = F.cross_entropy(logits, target)
    loss_ours = ours.loss(LocalInputs(h, h, torch.tensor(0.0), logits, ce, target, image, extras))
    (grad_ours,) = torch.autograd.grad(loss_ours, h)

    ema_theirs = copy.deepcopy(model.EMA_Net[k])
    for live, average in zip(block.parameters(), ema_theirs.parameters(), strict=True):
        average.data = average.data * model.momentum + live.data * (1 - model.momentum)  # their loop
    ema_ours = copy.deepcopy(model.EMA_Net[k])
    nets["ema"].block = ema_ours
    ours.take_next_weights(nets, [p.detach() for p in block.parameters()], 1)
    ema_gap = max(
        (a - b).abs().max().item()
        for a, b in zip(ema_theirs.parameters(), ema_ours.parameters(), strict=True)
    )
    return {
        "y": (extras["head_input"] - y_theirs).abs().max().item(),
        "loss": abs(loss_ours.item() - loss_theirs.item()),
        "grad_h": (grad_ours - grad_theirs).abs().max().item(),
        "ema": ema_gap,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a clone of the authors' repository")
    args = parser.parse_args()
    torch.manual_seed(0)
    batch = 8
    model = _their_model(args.checkout, batch)
    model.train()
    image, target = cifar_batch(batch)
    report(lambda k: compare(model, k, image, target), range(len(model.Encoder_Net) - 1))


if __name__ == "__main__":
    main()
