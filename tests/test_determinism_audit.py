"""train.deterministic on CUDA: which networks of a module run an operation without a deterministic
CUDA kernel, found on a CPU for every backbone × objective × head, against torch's documented list."""

from __future__ import annotations

import functools
import re

import pytest
import torch
import torch.nn.functional as F

from trgl_pipe.config import load_config
from trgl_pipe.errors import ConfigError
from trgl_pipe.models.determinism import CUDA_THROWS, as_on_cuda, audit
from trgl_pipe.models.heads import AveragePool
from trgl_pipe.partition import split_by_depth
from trgl_pipe.stage import audit_cuda_determinism, build_parts


def _documented_throwing() -> set[str]:
    doc = torch.use_deterministic_algorithms.__doc__ or ""
    section = doc.split("will throw a")[2].split("when ``mode=True``:")[1].split("In addition")[0]
    return set(re.findall(r":(?:class|func):`([\w.]+)`", section))


def test_the_table_is_torchs_documented_list() -> None:
    # a torch release that adds or removes an entry fails here: update CUDA_THROWS with its ops
    assert set(CUDA_THROWS) == _documented_throwing()


def test_the_audit_names_the_network_whose_forward_ran_the_backward() -> None:
    body = torch.nn.Conv2d(3, 4, 3, padding=1)
    decoder = torch.nn.Sequential(torch.nn.Upsample(size=(12, 12), mode="bilinear"), torch.nn.Conv2d(4, 3, 1))
    x = torch.randn(2, 3, 6, 6)

    def step() -> None:
        h = body(x)
        (decoder(h).sum() + F.adaptive_avg_pool2d(h, 4).sum()).backward()

    found = audit(step, {"body": body, "decoder": decoder})
    assert {(f.network, f.op, f.documented_as) for f in found} == {
        ("decoder", "upsample_bilinear2d_backward", "torch.nn.functional.interpolate"),
        ("the local loss", "_adaptive_avg_pool2d_backward", "torch.nn.AdaptiveAvgPool2d"),
    }


@pytest.mark.parametrize(("h", "w", "bins"), [(8, 12, 4), (7, 7, 7), (1, 1, 7), (2, 2, 4), (7, 7, 2)])
def test_a_pool_takes_an_exact_kernel_as_on_a_gpu_where_one_exists(h, w, bins) -> None:
    pool = AveragePool(bins)
    x = torch.randn(2, 3, h, w, dtype=torch.float64, requires_grad=True)
    found = audit(lambda: pool(x).sum().backward(), {"head": pool})
    assert (found == []) == pool.exact_for(h, w)
    with as_on_cuda():
        assert torch.allclose(pool(x), F.adaptive_avg_pool2d(x, bins), rtol=0, atol=1e-12)
    assert torch.equal(pool(x), F.adaptive_avg_pool2d(x, bins))  # on a CPU: the adaptive pool


BACKBONES = {
    "cifar_resnet": ["model.depth=8", "model.width=8"],
    "resnet18": [],
    "vgg11_bn": [],
    "swin_t": ["model.patch_size=2", "model.window_size=2"],
}
OBJECTIVES = {
    "trgl": [],
    "vangl": ["trgl.enabled=false"],
    "infopro": ["trgl.enabled=false"],
    "infopro_l": ["trgl.enabled=false"],
    "predsim": ["trgl.enabled=false"],
    "man": ["trgl.enabled=false"],
    "hpff": ["trgl.enabled=false"],
}
HEADS = ["conv", "dgl_cnn", "dgl_mlp_sr", "sedona"]
# What each finding may be, and why (every other network of every combination must be exact):
EXPLAINED = {
    # InfoPro's decoder (MAN's too) restores the image with a bilinear upsampling, as their authors do
    ("aux.decoder", "upsample_bilinear2d_backward"),
    # HPFF's patch decoders resize each quadrant bilinearly, as their authors do
    ("aux.patches", "upsample_bilinear2d_backward"),
    # DGL's MLP-SR head pools a 32x32 map to 8x8, then its 8x8 map to 2x2, exactly; its 7x7 map
    # of the first ResNet-18 module (8x8 input from the stem's pools) goes to 2x2 bins: inexact
    ("head", "_adaptive_avg_pool2d_backward"),
}


@functools.cache
def _parts(arch: str):
    """One backbone per architecture (the audit copies the blocks it trains): VGG's classifier
    alone has 120 M parameters to initialise."""
    cfg = load_config(None, [f"model.arch={arch}", *BACKBONES[arch], "model.num_modules=2"])
    return build_parts(cfg, (3, 32, 32), 10)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("arch", BACKBONES)
def test_every_backbone_objective_and_head(arch: str, objective: str, head: str) -> None:
    overrides = [
        f"model.arch={arch}",
        *BACKBONES[arch],
        f"objective.name={objective}",
        *OBJECTIVES[objective],
        f"aux.type={head}",
        "model.num_modules=2",
    ]
    try:
        cfg = load_config(None, overrides)
        parts = _parts(arch)
        partition = split_by_depth(parts.num_blocks, 2)
        found = [audit_cuda_determinism(cfg, parts, partition, k, 10) for k in range(2)]
    except ConfigError as refused:  # a combination the config refuses (one line) is not run
        assert "\n" not in str(refused)
        pytest.skip(f"refused: {refused}")
    for k, findings in enumerate(found):
        for f in findings:
            assert (f.network, f.op) in EXPLAINED, (k, str(f))
            if f.network == "head":  # only an inexact pool: the head says so too
                assert head.startswith("dgl") or arch == "vgg11_bn", (k, str(f))
    decoder = any(f.network in ("aux.decoder", "aux.patches") for f in found[0])
    # module 0 of 2 reconstructs (InfoPro; MAN and HPFF with InfoPro's decoder); the last does not
    assert decoder == (objective.startswith("infopro") or objective in ("man", "hpff"))
