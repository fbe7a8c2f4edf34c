"""Search spaces as data: loading, validation errors, sampling and the encoding."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nas.channels import make_divisible
from nas.models import build
from nas.space import ArchFormatError, SpaceError, decode, list_spaces, load_space, reference
from nas.space.arch import Arch, BlockSpec

SHIPPED = ["mbv2", "mbv3", "mbv3_small", "mbv3_224"]
MBV3 = yaml.safe_load((Path(__file__).parents[1] / "search_spaces" / "mbv3.yaml").read_text())


def test_shipped_spaces_are_listed_and_load():
    names = list_spaces()
    for name in SHIPPED:
        assert name in names
        space = load_space(name)
        assert space.name == name
        assert space.stages and space.max_blocks >= len(space.stages)


@pytest.mark.parametrize("name", SHIPPED)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_encoding_round_trips_for_random_samples(name, seed):
    space = load_space(name)
    arch = space.sample(np.random.default_rng(seed))
    text = arch.encode()
    assert decode(text) == arch
    assert decode(text).encode() == text
    assert text.startswith("nas1-")
    assert all(c.isalnum() or c in "._-" for c in text)


def _write(tmp_path: Path, data, name="custom.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_user_adds_a_space_by_adding_a_file(tmp_path, monkeypatch):
    spec = {**MBV3, "width": [0.25], "stages": MBV3["stages"][:3]}
    _write(tmp_path, spec, "tiny.yaml")
    monkeypatch.setenv("NAS_SPACES_DIR", str(tmp_path))
    assert "tiny" in list_spaces()
    space = load_space("tiny")
    arch = space.sample(0)
    assert arch.width == 0.25
    assert len(space.stages) == 3


def _bad(**changes):
    spec = copy.deepcopy(MBV3)
    for key, value in changes.items():
        target, _, leaf = key.rpartition("__")
        node = spec
        for part in target.split("__") if target else []:
            node = node[int(part)] if part.isdigit() else node[part]
        node[leaf] = value
    return spec


@pytest.mark.parametrize(
    ("spec", "key", "phrase"),
    [
        (_bad(colour="red"), "colour", "unknown key; allowed keys are description"),
        (_bad(stages__2__kernels=[3]), "stages[2].kernels", "unknown key"),
        (_bad(block__kernel=[3, 4]), "block.kernel", "4 is not allowed; expected a depthwise kernel size in {3, 5, 7}"),
        (_bad(stages__1__kernel=4), "stages[1].kernel", "4 is not allowed"),
        (_bad(block__expansion=[0, 3]), "block.expansion", "0 is not allowed; expected a number >= 1"),
        (_bad(block__se=[]), "block.se", "empty choice list"),
        (_bad(stages__3__channels=0), "stages[3].channels", "0 is not allowed; expected a positive integer"),
        (_bad(stages__3__channels=-16), "stages[3].channels", "-16 is not allowed"),
        (_bad(block__activation=["relu", "gelu"]), "block.activation", "'gelu' is not allowed; expected one of relu"),
        (_bad(stem__activation="swish"), "stem.activation", "'swish' is not allowed"),
        (_bad(stages__2__stride=3), "stages[2].stride", "3 is not allowed; expected one of 1, 2"),
        (_bad(stages__2__depth=0), "stages[2].depth", "expected an integer >= 1"),
        (_bad(width=[]), "width", "empty choice list"),
        (_bad(stages=[]), "stages", "non-empty list"),
        (_bad(references=[{"name": "resnet50"}]), "references[0].name", "unknown reference 'resnet50'"),
        (_bad(block__kernel=[True]), "block.kernel", "True is not allowed"),
    ],
)
def test_malformed_space_names_file_key_and_allowed(tmp_path, spec, key, phrase):
    path = _write(tmp_path, spec)
    with pytest.raises(SpaceError) as err:
        load_space(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: {key}: "), msg
    assert phrase in msg
    assert "\n" not in msg


def test_spaces_are_found_in_the_working_directory_first(tmp_path, monkeypatch):
    """./search_spaces of the folder a command runs in: a user's space beside their project, and one
    that shadows a shipped name."""
    (tmp_path / "search_spaces").mkdir()
    mine = {**MBV3, "width": [0.35]}
    _write(tmp_path / "search_spaces", mine, "mine.yaml")
    _write(tmp_path / "search_spaces", mine, "mbv3.yaml")
    monkeypatch.chdir(tmp_path)
    assert list_spaces()["mine"] == tmp_path / "search_spaces" / "mine.yaml"
    assert load_space("mine").width == (0.35,)
    assert load_space("mbv3").width == (0.35,)  # the working directory's mbv3 wins over the shipped one
    assert "mbv3_small" in list_spaces()  # shipped spaces stay available


def test_missing_required_key(tmp_path):
    spec = {k: v for k, v in MBV3.items() if k != "stem"}
    with pytest.raises(SpaceError, match=r"custom.yaml: stem: missing required key"):
        load_space(_write(tmp_path, spec))


def test_hidden_classifier_layer_without_head_is_refused(tmp_path):
    spec = {k: v for k, v in MBV3.items() if k != "head"}
    with pytest.raises(SpaceError, match=r"custom.yaml: classifier: a hidden classifier layer needs a head conv"):
        load_space(_write(tmp_path, spec))


def test_head_and_classifier_sections_are_optional(tmp_path):
    """No classifier section: one linear layer on the head (MobileNetV2); no head either: the last block
    is pooled (MobileNetV1). The encoding leaves the segments out and the builder the layers."""
    no_fc = load_space(_write(tmp_path, {k: v for k, v in MBV3.items() if k != "classifier"}, "no_fc.yaml"))
    bare = load_space(_write(tmp_path, {k: v for k, v in MBV3.items() if k not in ("head", "classifier")}, "bare.yaml"))
    for space, head, segments in ((no_fc, 960, ("head_c",)), (bare, None, ())):
        arch = space.sample(1)
        text = arch.encode()
        assert arch.head_channels == head and arch.classifier_channels is None
        assert "fc_c" not in text and ("head_c" in text) == bool(segments)
        assert decode(text) == arch
        model = build(arch, num_classes=10)
        linears = [m for m in model.classifier.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == 1
        assert linears[0].in_features == (make_divisible(960 * arch.width) if head else model.features[-1].out_channels)


def test_stage_without_block_choice_and_no_default(tmp_path):
    spec = {k: v for k, v in MBV3.items() if k != "block"}
    with pytest.raises(SpaceError, match=r"stages\[1\]\.kernel: missing required key \(or in the top-level 'block'"):
        load_space(_write(tmp_path, spec))


def test_malformed_yaml_reports_line(tmp_path):
    path = _write(tmp_path, "resolution: 32\nwidth: [0.5, 1.0\nstem: {channels: 16}\n")
    with pytest.raises(SpaceError, match=r"custom.yaml: malformed YAML \(line \d+, column \d+\)"):
        load_space(path)


def test_unknown_space_lists_available():
    with pytest.raises(SpaceError) as err:
        load_space("no_such_space")
    msg = str(err.value)
    assert "unknown search space 'no_such_space'" in msg
    for name in SHIPPED:
        assert name in msg
    assert "+space=NAME" in msg


def test_sampling_through_optuna_names_every_choice():
    space = load_space("mbv3")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    trial = study.ask()
    arch = space.sample(trial)
    params = trial.params
    assert "width" in params and "s1.depth" in params
    assert params["width"] == arch.width
    # Stage 0 is fixed in mbv3.yaml: fixed dimensions create no parameter.
    assert not any(k.startswith("s0.") for k in params)
    depths = [params[f"s{i}.depth"] for i in range(1, 6)]
    assert len(arch.blocks) == 1 + sum(depths)
    # A FixedTrial with the same params rebuilds the same architecture (how resumed trials are re-read).
    assert space.sample(optuna.trial.FixedTrial(params)) == arch


def test_seeded_sampling_is_reproducible_and_varied():
    space = load_space("mbv3")
    a = [space.sample(np.random.default_rng(7)).encode() for _ in range(2)]
    assert a[0] == a[1]
    assert space.sample(random.Random(1)) == space.sample(random.Random(1))
    assert len({space.sample(s).encode() for s in range(20)}) > 15


def test_extremes_bound_the_space():
    space = load_space("mbv3")
    lo, hi = space.extreme("min"), space.extreme("max")
    assert lo.width == 0.5 and hi.width == 1.0
    assert len(lo.blocks) < len(hi.blocks)
    assert all(not b.se and b.activation == "relu" for b in lo.blocks[1:])


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("resnet", "must start with a format version"),
        ("nas9-r32-w1-stem_c16_s1_hs-k3_e1_c16_s1_re-head_c960_hs-fc_c1280", "format 'nas9' is not supported"),
        ("nas1-r32-w1-stem_c16_s1_hs-k4_e1_c16_s1_re-head_c960_hs-fc_c1280", "kernel 4"),
        ("nas1-r32-w1-stem_c16_s1_hs-k3_e1_c16_s1_xx-head_c960_hs-fc_c1280", "block segment 'k3_e1_c16_s1_xx'"),
        ("nas1-r32-w1-stem_c16_s1_hs-head_c960_hs-fc_c1280", "at least one block"),
        ("nas1-r32-w1-stem_c32_s1_r6-ds_k3_e6_c64_s1_r6", "block segment 'ds_k3_e6_c64_s1_r6'"),
        ("nas1-r32-w1-stem_c32_s1_r6-ds_k4_c64_s1_r6", "kernel 4"),
        ("nas1-r32-w1-stem_c32_s1_r6-ds_k3_c64_s1_r6-fc_c1280", "without a head conv"),
        ("nas1-r32-w1-stem_c32_s1_r6-k3_e1_c16_s1_r7-head_c1280_r6", "block segment 'k3_e1_c16_s1_r7'"),
        ("nas1-r32-w1-stem_c32_s1_r6-head_c1280_r6", "at least one block"),
    ],
)
def test_decode_rejects_malformed_strings(text, phrase):
    with pytest.raises(ArchFormatError, match="cannot decode architecture") as err:
        decode(text)
    assert phrase in str(err.value)


def test_fractional_expansion_round_trips():
    arch = reference("mobilenet_v3_small")
    assert any(b.expansion == 3.67 for b in arch.blocks)
    assert "e3.67" in arch.encode() and "e4.5" in arch.encode()
    assert decode(arch.encode()) == arch


def test_reference_adaptation_for_small_inputs():
    ref = reference("mobilenet_v3_small", resolution=32, stem_stride=1, first_stride2_as_1=1)
    assert ref.resolution == 32 and ref.stem_stride == 1
    assert ref.blocks[0].stride == 1 and ref.blocks[1].stride == 2
    with pytest.raises(ValueError, match="unknown reference"):
        reference("resnet18")


def test_block_spec_validates():
    with pytest.raises(ValueError, match="kernel 4"):
        BlockSpec(kernel=4, expansion=3, out_channels=16, stride=1, activation="relu", se=False)
    with pytest.raises(ValueError, match="at least one block"):
        Arch(32, 1.0, 16, 1, "hswish", (), 960, "hswish", 1280)


_ACTS = st.sampled_from(["relu", "relu6", "hswish"])
_IR_BLOCKS = st.builds(
    BlockSpec,
    kernel=st.sampled_from([3, 5, 7]),
    expansion=st.sampled_from([1, 2.3, 2.5, 3, 3.67, 4.5, 6]),
    out_channels=st.integers(1, 2048),
    stride=st.sampled_from([1, 2]),
    activation=_ACTS,
    se=st.booleans(),
)
_DS_BLOCKS = st.builds(
    BlockSpec,
    kernel=st.sampled_from([3, 5, 7]),
    expansion=st.just(1),
    out_channels=st.integers(1, 2048),
    stride=st.sampled_from([1, 2]),
    activation=_ACTS,
    se=st.booleans(),
    kind=st.just("ds"),
)
# (head channels, head activation, hidden layer): V3 (both), V2 (head only), V1 (neither).
_TAILS = st.one_of(
    st.tuples(st.integers(1, 4096), _ACTS, st.integers(1, 4096)),
    st.tuples(st.integers(1, 4096), _ACTS, st.none()),
    st.just((None, None, None)),
)


@settings(max_examples=500, deadline=None)
@given(
    resolution=st.integers(1, 1024),
    width=st.sampled_from([0.25, 0.35, 0.5, 0.75, 1.0, 1.3, 2.0]),
    stem=st.tuples(st.integers(1, 256), st.sampled_from([1, 2]), _ACTS),
    blocks=st.lists(st.one_of(_IR_BLOCKS, _DS_BLOCKS), min_size=1, max_size=8),
    tail=_TAILS,
)
def test_every_architecture_round_trips(resolution, width, stem, blocks, tail):
    """Both block kinds, every activation, with and without head conv and hidden layer."""
    arch = Arch(resolution, width, *stem, tuple(blocks), *tail)
    text = arch.encode()
    assert decode(text) == arch
    assert decode(text).encode() == text
    assert all(c.isalnum() or c in "._-" for c in text)
    assert text.count("ds_") == sum(b.kind == "ds" for b in blocks)


def test_strings_written_before_v1_and_v2_blocks_decode_unchanged():
    """A string the encoding wrote before block kinds, ReLU6 and optional segments existed (MobileNetV3-Small
    as the quick start printed it) still decodes to the same network."""
    old = (
        "nas1-r224-w1-stem_c16_s2_hs-k3_e1_c16_s2_re_se-k3_e4.5_c24_s2_re-k3_e3.67_c24_s1_re-k5_e4_c40_s2_hs_se"
        "-k5_e6_c40_s1_hs_se-k5_e6_c40_s1_hs_se-k5_e3_c48_s1_hs_se-k5_e3_c48_s1_hs_se-k5_e6_c96_s2_hs_se"
        "-k5_e6_c96_s1_hs_se-k5_e6_c96_s1_hs_se-head_c576_hs-fc_c1024"
    )
    arch = decode(old)
    assert arch == reference("mobilenet_v3_small")
    assert arch.encode() == old
    assert all(b.kind == "ir" for b in arch.blocks)


def test_depthwise_separable_blocks_have_no_expansion():
    with pytest.raises(ValueError, match="no expansion"):
        BlockSpec(kernel=3, expansion=6, out_channels=64, stride=1, activation="relu6", se=False, kind="ds")
    with pytest.raises(ValueError, match="block kind 'mb'"):
        BlockSpec(kernel=3, expansion=1, out_channels=64, stride=1, activation="relu6", se=False, kind="mb")
