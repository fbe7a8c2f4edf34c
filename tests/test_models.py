"""The builder: MobileNetV3 semantics, forward passes, cost model (parity with peers: test_references.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import SqueezeExcitation

from nas.models import build, cost, count_params
from nas.models.blocks import InvertedResidual
from nas.space import decode, load_space, reference


def test_block_semantics():
    arch = decode("nas1-r32-w1-stem_c16_s1_hs-k3_e1_c16_s1_re-k5_e4_c24_s2_hs_se-k3_e6_c24_s1_re-head_c96_hs-fc_c128")
    model = build(arch, num_classes=10)
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert [b.use_res_connect for b in blocks] == [True, False, True]
    # expansion 1: no expand conv; SE squeeze = make_divisible(64 // 4) = 16 with a hard-sigmoid gate.
    assert len(blocks[0].block) == 2
    se = next(m for m in blocks[1].modules() if isinstance(m, SqueezeExcitation))
    assert se.fc1.out_channels == 16 and isinstance(se.scale_activation, nn.Hardsigmoid)
    assert any(isinstance(m, nn.Hardswish) for m in blocks[1].modules())
    # The projection is linear: its last module is BatchNorm, not an activation.
    assert isinstance(blocks[2].block[-1][-1], nn.BatchNorm2d)
    # The classifier has no BatchNorm, and applies dropout.
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.classifier.modules())
    assert any(isinstance(m, nn.Dropout) for m in model.classifier.modules())


def test_width_multiplier_rounds_channels_to_eight():
    arch = decode("nas1-r32-w0.75-stem_c16_s1_hs-k3_e3_c40_s2_re-head_c960_hs-fc_c1280")
    model = build(arch, num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)
    assert convs[0].out_channels == 16  # 16 * 0.75 = 12 -> 16
    assert model.classifier[0].in_features == 720  # 960 * 0.75


@pytest.mark.parametrize("name", ["mbv3", "mbv3_small"])
@pytest.mark.parametrize("resolution", [32, 224])
def test_forward_on_random_samples(name, resolution):
    space = load_space(name)
    rng = np.random.default_rng(resolution)
    for _ in range(3):
        arch = space.sample(rng)
        model = build(arch, num_classes=7).eval()
        with torch.no_grad():
            out = model(torch.randn(2, 3, resolution, resolution))
        assert out.shape == (2, 7)
        assert torch.isfinite(out).all()


def test_decoded_arch_builds_identical_network():
    space = load_space("mbv3")
    for seed in range(10):
        arch = space.sample(seed)
        a, b = build(arch, 10), build(decode(arch.encode()), 10)
        assert count_params(a) == count_params(b)
        assert str(a) == str(b)


def test_cost_uses_flop_counter_and_scales_with_resolution():
    arch = reference("mobilenet_v3_small")
    c224 = cost(arch, num_classes=1000)
    assert c224.params == 2_542_856
    # torchvision documents 0.06 GFLOPS (multiply-adds) for V3-Small at 224: FlopCounterMode counts 2 per MAC.
    assert 100e6 < c224.flops < 140e6
    c112 = cost(arch, num_classes=1000, resolution=112)
    assert 0.25 < c112.flops / c224.flops < 0.35  # convs scale by 1/4, the classifier does not


def test_build_rejects_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        build(reference("mobilenet_v3_small"), num_classes=0)


@pytest.mark.parametrize("act", ["re", "hs"])
def test_every_activation_backpropagates_with_dropout(act):
    # A ReLU head followed by an in-place dropout broke backward ("modified by an inplace operation").
    arch = decode(f"nas1-r16-w0.5-stem_c16_s1_{act}-k3_e2_c16_s2_{act}_se-k5_e3_c24_s2_{act}-head_c64_{act}-fc_c64")
    model = build(arch, 10, dropout=0.5).train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
