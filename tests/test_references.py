"""The yardsticks against their peers' own code: torchvision's and timm's MobileNets.

Parameter counts, multiply-adds (FlopCounterMode on both models) and outputs: the peer's weights (with
randomised BatchNorm statistics, so every layer matters) copied into ours in order give the same class
scores. timm's ``tf_`` minimal variants pad like TensorFlow ("same"); built with symmetric padding they
are the same network as ours.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import SqueezeExcitation

from nas.models import build, cost, count_params
from nas.models.blocks import DepthwiseSeparable, InvertedResidual
from nas.space import REFERENCE_NAMES, arch_from_text, reference


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, **kwargs)


# name -> (the peer's model, parameters at 1000 classes as the issue / the peer publish them)
PEERS = {
    "mobilenet_v1": (_timm("mobilenetv1_100"), 4_231_976),
    "mobilenet_v2": (torchvision.models.mobilenet_v2, 3_504_872),
    "mobilenet_v3_large": (torchvision.models.mobilenet_v3_large, 5_483_032),
    "mobilenet_v3_small": (torchvision.models.mobilenet_v3_small, 2_542_856),
    "mobilenet_v3_large_075": (_timm("mobilenetv3_large_075"), 3_993_528),
    "mobilenet_v3_small_075": (_timm("mobilenetv3_small_075"), 2_041_872),
    "mobilenet_v3_small_050": (_timm("mobilenetv3_small_050"), 1_593_224),
    "mobilenet_v3_large_minimal": (_timm("tf_mobilenetv3_large_minimal_100", pad_type=""), 3_924_288),
    "mobilenet_v3_small_minimal": (_timm("tf_mobilenetv3_small_minimal_100", pad_type=""), 2_044_736),
}  # fmt: skip


def test_every_reference_has_a_peer():
    assert set(PEERS) == set(REFERENCE_NAMES)


def _copy_weights_in_order(ours: nn.Module, theirs: nn.Module) -> None:
    """Same layers in the same order, other names (timm's ``conv_head`` is our hidden Linear as a 1x1
    conv): copy tensor by tensor, each of the same size, and take the peer's BatchNorm epsilon."""
    src = list(theirs.state_dict().values())
    dst = ours.state_dict()
    assert len(src) == len(dst)
    for (name, mine), peer in zip(dst.items(), src, strict=True):
        assert mine.numel() == peer.numel(), name
        mine.copy_(peer.reshape(mine.shape))
    eps = {m.eps for m in theirs.modules() if isinstance(m, nn.BatchNorm2d)}
    assert len(eps) == 1
    for m in ours.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = next(iter(eps))


def _flops(model: nn.Module) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.randn(1, 3, 224, 224))
    return counter.get_total_flops()


@pytest.mark.parametrize("name", list(PEERS))
def test_reference_is_the_peer_network(name):
    make_theirs, params = PEERS[name]
    torch.manual_seed(0)
    theirs = make_theirs().eval()
    ours = build(reference(name), num_classes=1000).eval()
    assert count_params(ours) == count_params(theirs) == params
    assert cost(reference(name), num_classes=1000).flops == _flops(theirs)
    for m in theirs.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    _copy_weights_in_order(ours, theirs)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = theirs(x)
        assert expected.shape == (2, 1000)
        # Float32 sums in another order (a 1x1 conv vs a Linear): equal to 1e-5 of the scores' scale.
        torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "mobilenet_v3_small"])
def test_torchvision_v3_weights_load_by_name(name):
    """Module names follow torchvision's MobileNetV3, so its state dict loads as it is."""
    theirs = getattr(torchvision.models, name)()
    ours = build(reference(name), num_classes=1000)
    ours.load_state_dict(theirs.state_dict())


@pytest.mark.parametrize(("name", "timm_name"), [("mobilenet_v3_large", "mobilenet_v3_large_075")])
def test_both_meanings_of_width_075_are_expressible(name, timm_name):
    """torchvision's width_mult scales every layer (our ``w0.75``); timm's is another network."""
    theirs = getattr(torchvision.models, name)(width_mult=0.75)
    ours = build(reference(name, width=0.75), num_classes=1000)
    assert count_params(ours) == count_params(theirs) == 3_377_576
    ours.load_state_dict(theirs.state_dict())
    assert count_params(build(reference(timm_name), num_classes=1000)) == PEERS[timm_name][1] != 3_377_576


def test_v1_and_v2_semantics():
    v1 = build(reference("mobilenet_v1"), num_classes=10)
    ds = [m for m in v1.modules() if isinstance(m, DepthwiseSeparable)]
    assert len(ds) == 13 and not any(isinstance(m, InvertedResidual) for m in v1.modules())
    # An activation after the pointwise conv (ReLU6), no residual: a stride-1 128->128 block is not x + f(x).
    assert all(isinstance(b.block[-1][-1], nn.ReLU6) for b in ds)
    assert isinstance(v1.features[-1], DepthwiseSeparable)  # no head conv: the last block is pooled
    assert [type(m) for m in v1.classifier] == [nn.Dropout, nn.Linear] and v1.classifier[1].in_features == 1024
    v2 = build(reference("mobilenet_v2"), num_classes=10)
    assert not any(isinstance(m, (nn.Hardswish, nn.ReLU, SqueezeExcitation)) for m in v2.modules())
    assert v2.features[-1][0].out_channels == 1280 and v2.classifier[1].in_features == 1280
    blocks = [m for m in v2.modules() if isinstance(m, InvertedResidual)]
    assert sum(b.use_res_connect for b in blocks) == 10  # torchvision's mobilenet_v2 has 10 residual blocks


@pytest.mark.parametrize("name", list(PEERS))
def test_small_images_get_the_cifar_adaptation(name):
    arch = arch_from_text(f"reference:{name}", image_size=8)
    assert arch.resolution == 32 and arch.stem_stride == 1
    assert arch.blocks[0].stride == 1
    assert [b.stride for b in arch.blocks].count(2) == [b.stride for b in reference(name).blocks].count(2) - 1
    out = build(arch, num_classes=10).eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
