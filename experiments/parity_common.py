"""What the parity scripts against MAN's and HPFF's code share: their CIFAR normalisation, a
batch, their ``.cuda()`` calls made no-ops, and the report over modules."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

MEAN = tuple(x / 255.0 for x in (125.3, 123.0, 113.9))  # their CIFAR normalisation
STD = tuple(x / 255.0 for x in (63.0, 62.1, 66.7))


def cpu_only() -> None:
    """Their models call ``.cuda()`` while being built; here that leaves tensors where they are."""
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    torch.nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]


def cifar_batch(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalised image batch whose pixels lie inside [0, 1] (their target is not clamped), and labels."""
    pixels = torch.rand(batch, 3, 32, 32) * 0.98 + 0.01
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (pixels - mean) / std, torch.randint(0, 10, (batch,))


def report(compare: Callable[[int], dict[str, float]], modules: Iterable[int]) -> None:
    """Print each module's largest differences and exit 1 unless every one is 0."""
    worst: dict[str, float] = {}
    for k in modules:
        gaps = compare(k)
        print(f"module {k:2d}: " + "  ".join(f"{name} {gap:.3g}" for name, gap in gaps.items()))
        worst = {name: max(worst.get(name, 0.0), gap) for name, gap in gaps.items()}
    print("largest differences over the modules: " + ", ".join(f"{n} {g:.3g}" for n, g in worst.items()))
    if any(worst.values()):
        raise SystemExit("not bit for bit")
