"""AugLocal's auxiliary network and loss against the authors' code, on identical weights and inputs.

    python experiments/parity_auglocal.py AUTHORS_CHECKOUT      # a clone of ChenxiangMA/AugLocal

For ResNet-32 on CIFAR-10 shapes (their ``net_dim``: 16 layers, the stem and 15 blocks of widths
16, 32, 64), every module end L = 1 … 14 and every depth d their commands use (1, 3, 5): their
``AuxNetwork(net_config="unifSamp")`` and trgl_pipe's ``auxiliary_network`` are built, theirs'
weights are copied into trgl_pipe's in order (the parameter shapes must agree one for one), and
both run the same batch in training mode: logits and cross-entropy must be equal bit for bit.
Their code is imported from the checkout given, never copied here; it has no licence.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trgl_pipe.objectives.auglocal import auxiliary_network  # noqa: E402
from trgl_pipe.objectives.base import ModuleSpec  # noqa: E402

NET_DIM = [16] * 6 + [32] * 5 + [64] * 5  # their ResNet-32: the stem, then 15 blocks
SIDES = [32] * 6 + [16] * 5 + [8] * 5


def compare(authors: object, layer: int, depth: int) -> tuple[int, float, float]:
    """(parameters compared, largest |logit difference|, |CE difference|) for one module end."""
    shapes = [(c, s, s) for c, s in zip(NET_DIM, SIDES, strict=True)]
    spec = ModuleSpec(
        index=layer,
        num_modules=len(NET_DIM),
        in_shape=shapes[layer - 1],
        out_shape=shapes[layer],
        image_shape=(3, 32, 32),
        num_classes=10,
        last_block=layer,
        later_shapes=tuple(shapes[layer + 1 :]),
    )
    torch.manual_seed(layer * 10 + depth)
    theirs = authors.AuxNetwork(  # type: ignore[attr-defined]
        NET_DIM[layer],
        net_config="unifSamp",
        class_num=10,
        layer_index=layer,
        aux_net_depth=depth,
        net_dim=NET_DIM,
        image_size=32,
    )
    ours = auxiliary_network(spec, depth, 1.0)
    a, b = list(theirs.state_dict().values()), ours.state_dict()
    if [t.shape for t in a] != [t.shape for t in b.values()]:
        raise SystemExit(f"layer {layer}, d={depth}: the two networks' parameters differ in shape")
    ours.load_state_dict(dict(zip(b, a, strict=True)))
    x = torch.randn(8, NET_DIM[layer], SIDES[layer], SIDES[layer])
    y = torch.arange(8) % 10
    theirs.train(), ours.train()
    with torch.no_grad():
        loss_theirs, logits_theirs = theirs(x, y)
        logits = ours(x)
        loss = F.cross_entropy(logits, y)  # trgl_pipe's CE of F_k, as the stage computes it
    return len(a), float((logits - logits_theirs).abs().max()), abs(float(loss) - float(loss_theirs))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("authors", type=Path, help="a checkout of the authors' repository")
    args = parser.parse_args()
    sys.path.insert(0, str(args.authors))
    from networks import auxiliary_nets as authors  # their package, from their checkout

    torch.set_num_threads(1)
    print("| module ends at layer | d | tensors | largest logit difference | CE difference |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for depth in (1, 3, 5):
        for layer in range(1, len(NET_DIM) - 1):
            count, logits, ce = compare(authors, layer, depth)
            worst = max(worst, logits, ce)
            print(f"| {layer} | {depth} | {count} | {logits:.1e} | {ce:.1e} |")
    print(f"\nlargest difference over every row: {worst:.1e}")
    return 0 if worst == 0.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
