"""Any space a user may write, not only the shipped ones: sample, round-trip, build, train a step.

Spaces are generated from everything the schema allows (kernels 3/5/7, fractional expansions,
SE, every activation everywhere, 1-4 stages, tiny inputs down to 8 px, with or without a head conv
and a hidden classifier layer), so a combination the shipped spaces never use (a ReLU6 head without
hidden layer, a stride-2 stem at 8 px) is exercised too.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from nas.latency.table import arch_components, space_components
from nas.models import build, cost, count_params
from nas.space import decode
from nas.space.schema import space_from_dict


def _one_or_more(elements: st.SearchStrategy) -> st.SearchStrategy:
    """A fixed value or a list of choices, as a space file may write either."""
    return st.lists(elements, min_size=1, max_size=3, unique=True).map(lambda v: v[0] if len(v) == 1 else v)


ACT = _one_or_more(st.sampled_from(["relu", "relu6", "hswish"]))
BLOCK = {
    "kernel": _one_or_more(st.sampled_from([3, 5, 7])),
    "expansion": _one_or_more(st.sampled_from([1, 2.3, 3, 4.5, 6])),
    "se": _one_or_more(st.booleans()),
    "activation": ACT,
}
STAGE = st.fixed_dictionaries(
    {
        "channels": _one_or_more(st.integers(4, 40)),
        "stride": _one_or_more(st.sampled_from([1, 2])),
        "depth": _one_or_more(st.integers(1, 3)),
    },
    optional=BLOCK,  # a stage may override the shared block choices
)
HEAD = st.fixed_dictionaries({"channels": _one_or_more(st.integers(8, 96)), "activation": ACT})
CLASSIFIER = st.fixed_dictionaries({"channels": _one_or_more(st.integers(8, 96))})
# MobileNetV3 (head + hidden layer), MobileNetV2 (head only), MobileNetV1 (neither).
TAILS = st.one_of(
    st.fixed_dictionaries({"head": HEAD, "classifier": CLASSIFIER}), st.fixed_dictionaries({"head": HEAD}), st.just({})
)
BODIES = st.fixed_dictionaries(
    {
        "resolution": _one_or_more(st.sampled_from([8, 12, 16])),
        "width": _one_or_more(st.sampled_from([0.25, 0.35, 0.5, 1.0])),
        "stem": st.fixed_dictionaries(
            {
                "channels": _one_or_more(st.integers(4, 24)),
                "stride": _one_or_more(st.sampled_from([1, 2])),
                "activation": ACT,
            }
        ),
        "block": st.fixed_dictionaries(BLOCK),
        "stages": st.lists(STAGE, min_size=1, max_size=4),
    }
)
SPACES = st.tuples(BODIES, TAILS).map(lambda parts: {**parts[0], **parts[1]})


@settings(max_examples=40, deadline=None)
@given(raw=SPACES, seed=st.integers(0, 2**16))
def test_any_valid_space_samples_networks_that_round_trip_build_and_train(raw, seed):
    space = space_from_dict(raw, "generated")
    arch = space.sample(np.random.default_rng(seed))
    text = arch.encode()
    assert decode(text) == arch and decode(text).encode() == text
    model = build(decode(text), 10, dropout=0.3).train()
    r = arch.resolution
    # What the search reports before training (counted on the meta device, never allocated) is the
    # network it then trains: parameters, and FLOPs of a real forward pass at the arch's resolution.
    before = cost(arch, 10)
    assert before.params == count_params(model)
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        model.eval()(torch.randn(1, 3, r, r))
    assert before.flops == flops.get_total_flops()
    model.train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, r, r)), torch.tensor([1, 7]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # The latency table enumerated for the space holds every layer of the sampled network.
    table_keys = {c.key for c in space_components(space, 10)}
    assert {c.key for c in arch_components(arch, 10)} <= table_keys
