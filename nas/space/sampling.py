"""Draw concrete architectures from a space.

The same code path serves Optuna (each choice becomes a named trial
parameter, so samplers can learn per-dimension preferences and the MLflow run
shows every choice) and plain seeded random sampling (tests, latency tables).
Dimensions with a single choice are fixed and create no parameter.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from nas.space.arch import Arch, BlockSpec
from nas.space.references import reference
from nas.space.schema import Choices, Space


class Chooser(Protocol):
    def __call__(self, name: str, choices: Sequence[Any]) -> Any: ...


def _chooser(source: Any) -> Chooser:
    if hasattr(source, "suggest_categorical"):  # optuna.Trial / FixedTrial
        return lambda name, choices: source.suggest_categorical(name, list(choices))
    if isinstance(source, np.random.Generator):
        return lambda name, choices: choices[int(source.integers(len(choices)))]
    if isinstance(source, random.Random):
        return lambda name, choices: source.choice(list(choices))
    if isinstance(source, int) and not isinstance(source, bool):
        return _chooser(np.random.default_rng(source))
    raise TypeError(
        f"cannot sample from {type(source).__name__}; pass an optuna.Trial, a numpy Generator, "
        "a random.Random or an integer seed"
    )


def _pick(choose: Chooser, name: str, choices: Choices) -> Any:
    return choices[0] if len(choices) == 1 else choose(name, choices)


def build_arch(space: Space, choose: Chooser) -> Arch:
    """Walk the space in a fixed order, asking ``choose`` for every non-fixed dimension."""
    resolution = _pick(choose, "resolution", space.resolution)
    width = _pick(choose, "width", space.width)
    stem_channels = _pick(choose, "stem.channels", space.stem_channels)
    stem_stride = _pick(choose, "stem.stride", space.stem_stride)
    stem_activation = _pick(choose, "stem.activation", space.stem_activation)
    blocks: list[BlockSpec] = []
    for i, stage in enumerate(space.stages):
        depth = _pick(choose, f"s{i}.depth", stage.depth)
        channels = _pick(choose, f"s{i}.channels", stage.channels)
        stride = _pick(choose, f"s{i}.stride", stage.stride)
        for j in range(depth):
            p = f"s{i}.b{j}"
            blocks.append(
                BlockSpec(
                    kernel=_pick(choose, f"{p}.kernel", stage.kernel),
                    expansion=_pick(choose, f"{p}.expansion", stage.expansion),
                    out_channels=channels,
                    stride=stride if j == 0 else 1,
                    activation=_pick(choose, f"{p}.activation", stage.activation),
                    se=_pick(choose, f"{p}.se", stage.se),
                )
            )
    return Arch(
        resolution=resolution,
        width=width,
        stem_channels=stem_channels,
        stem_stride=stem_stride,
        stem_activation=stem_activation,
        blocks=tuple(blocks),
        head_channels=_pick(choose, "head.channels", space.head_channels),
        head_activation=_pick(choose, "head.activation", space.head_activation),
        classifier_channels=_pick(choose, "classifier.channels", space.classifier_channels),
        source=space.name,
    )


def sample(space: Space, source: Any) -> Arch:
    """One architecture; ``source`` is an optuna trial, a numpy Generator, a random.Random or a seed."""
    return build_arch(space, _chooser(source))


_ORDER = {"relu": 0, "relu6": 1, "hswish": 2, False: 0, True: 1}


def _rank(value: Any) -> float:
    return _ORDER[value] if isinstance(value, (bool, str)) else float(value)


def extreme(space: Space, which: str = "min") -> Arch:
    """The cheapest (``min``) or costliest (``max``) network the space allows.

    Picks the smallest/largest value of every numeric dimension, SE off/on and
    ReLU/ReLU6/h-swish; used to tell up front whether a latency budget is reachable.
    Strides pick the opposite way (stride 2 is the cheaper).
    """
    if which not in ("min", "max"):
        raise ValueError("which must be 'min' or 'max'")
    pick = min if which == "min" else max
    inverse = max if which == "min" else min

    def choose(name: str, choices: Sequence[Any]) -> Any:
        fn = inverse if name.endswith("stride") else pick
        return fn(choices, key=_rank)

    return build_arch(space, choose)


def reference_archs(space: Space) -> dict[str, Arch]:
    """The space's yardsticks (hand-designed networks adapted to its resolution), by name."""
    return {
        ref.name: reference(
            ref.name,
            resolution=space.resolution[0],
            stem_stride=ref.stem_stride,
            first_stride2_as_1=ref.first_stride2_as_1,
        )
        for ref in space.references
    }
