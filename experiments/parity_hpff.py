"""HPFF's local loss and the gradient it sends back, against the authors' code, on identical
weights and inputs.

    python experiments/parity_hpff.py AUTHORS_CHECKOUT      # a clone of Zeudfish/HPFF

Their CIFAR ResNet-32 with K = 16 (their CIFAR command: 15 one-block modules) is built on the CPU
(their ``.cuda()`` calls are made no-ops for the run; their package folder is ``network``). For
every module i = 1 … 13 that their loop trains with a cascade: a batch goes through their stem and
modules 0 … i-2, then u = E_{i-1}(·) (module i's input) and E_i(u); trgl_pipe's ``HpffObjective``
for module i gets their heads' and patch decoders' weights (same layers, same order) and runs on
E_i(u). Compared, bit for bit: their step's loss (w_x · local CE on the detached path + w_y ·
cascade) against ours, their w_y · cascade against our ``loss_for_previous``, and its gradient
with respect to u (what module i sends to module i-1) against the gradient their step's backward
puts on u. Their code is imported from the checkout given, never copied here; it has no licence.
"""

from __future__ import annotations

import argparse
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
from trgl_pipe.objectives.hpff import HpffObjective  # noqa: E402

WEIGHTS = [5.0, 0.5, 0.0, 0.0]  # their README command's --ixx_1 --ixy_1 --ixx_2 --ixy_2
K = 16  # their --local_module_num (15 modules are built)


def _their_model(checkout: Path, batch: int) -> torch.nn.Module:
    sys.path.insert(0, str(checkout / "Exp on CIFAR_SVHN_STL"))
    cpu_only()
    module = importlib.import_module("network.resnetInfoPro_HPFF")
    return module.resnet32(  # type: ignore[attr-defined]
        local_module_num=K,
        batch_size=batch,
        image_size=32,
        dataset="cifar10",
        class_num=10,
        aux_net_config="2c2f",
        local_loss_mode="cross_entropy",
        aux_net_widen=1,
        aux_net_feature_dim=128,
    )


def compare(model: torch.nn.Module, i: int, image: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """The largest differences for module ``i`` (all must be 0)."""
    with torch.no_grad():
        h = model.relu(model.bn1(model.conv1(image)))
        for j in range(i - 1):
            h = model.Encoder_Net[j](h)
    u = model.Encoder_Net[i - 1](h).detach().requires_grad_()
    stage, index = model.infopro_config[i]
    net_classifier = getattr(model, f"net_classifier_{stage}_{index}")
    aux_decoder = getattr(model, f"aux_decoder_{stage}_{index}")
    aux_classifier = getattr(model, f"aux_classifier_{stage}_{index}")
    ratio = i / (K - 2)
    ixx = WEIGHTS[0] * (1 - ratio) + WEIGHTS[2] * ratio
    ixy = WEIGHTS[1] * (1 - ratio) + WEIGHTS[3] * ratio

    local = net_classifier(model.Encoder_Net[i](u.detach()), target)  # their x path: no gradient to u
    z = model.Encoder_Net[i](u)
    cascade = ixx * aux_decoder(z, model._image_restore(image)) + ixy * aux_classifier(z, target)
    theirs = model.wx * local + model.wy * cascade
    (grad_theirs,) = torch.autograd.grad(theirs, u)

    out = model.Encoder_Net[i](u)
    spec = ModuleSpec(i, K, tuple(u.shape[1:]), tuple(out.shape[1:]), (3, 32, 32), 10, mean=MEAN, std=STD)
    ours = HpffObjective(spec, weights=WEIGHTS)
    nets, head = ours.networks(), ours.head()
    head.net.load_state_dict(net_classifier.head.state_dict())
    nets["classifier"].net.load_state_dict(aux_classifier.head.state_dict())
    for mine, their in zip(nets["patches"].decoders, aux_decoder.decoders, strict=True):
        mine.net.load_state_dict(their.state_dict())
    nets.train()
    head.train()
    extras = ours.forward(nets, u, out, image)
    logits = head(out)
    ce = F.cross_entropy(logits, target)
    inputs = LocalInputs(u, out, torch.tensor(0.0), logits, ce, target, image, extras)
    loss, part = ours.loss(inputs), ours.loss_for_previous(inputs)
    assert part is not None
    (grad_ours,) = torch.autograd.grad(part, u)
    return {
        "loss": abs(loss.item() - theirs.item()),
        "sent_term": abs(part.item() - (model.wy * cascade).item()),
        "grad_u": (grad_ours - grad_theirs).abs().max().item(),
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
    report(lambda k: compare(model, k, image, target), range(1, len(model.Encoder_Net) - 1))


if __name__ == "__main__":
    main()
