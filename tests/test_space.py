"""Search spaces as data: loading, validation errors, sampling and the encoding."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nas.space import ArchFormatError, SpaceError, decode, list_spaces, load_space, reference
from nas.space.arch import Arch, BlockSpec

SHIPPED = ["mbv3", "mbv3_small", "mbv3_224"]
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


def test_missing_required_key(tmp_path):
    spec = {k: v for k, v in MBV3.items() if k != "head"}
    with pytest.raises(SpaceError, match=r"custom.yaml: head: missing required key"):
        load_space(_write(tmp_path, spec))


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
