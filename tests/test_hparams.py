"""The hyperparameters searched beside the architecture: ranges, relative ranges, bad specs."""

from __future__ import annotations

import re

import optuna
import pytest

from nas.errors import NasError
from nas.search.hparams import resolve_hparams, sample_hparams
from nas.space import decode
from nas.train.module import param_groups
from nas.train.run import apply_hparams, make_module
from tests.conftest import TINY_ARCH, compose_cfg


@pytest.mark.parametrize(("optimizer", "low", "high"), [("sgd", 0.01, 0.4), ("adamw", 0.0003, 0.012)])
def test_default_learning_rate_range_follows_the_optimizer(optimizer, low, high):
    cfg = compose_cfg(f"train/optimizer={optimizer}")
    spec = resolve_hparams(cfg.search.hparams, cfg)
    lr = spec["train.optimizer.lr"]
    assert (lr["low"], lr["high"]) == (low, high) and "relative" not in lr
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        values = sample_hparams(study.ask(), spec)
        assert low * 0.999 <= values["train.optimizer.lr"] <= high * 1.001
        assert values["train.label_smoothing"] in (0.0, 0.1)
        tuned = apply_hparams(cfg, values)
        assert tuned.train.optimizer.lr == values["train.optimizer.lr"]
        assert tuned.train.optimizer.weight_decay == values["train.optimizer.weight_decay"]
    assert cfg.train.optimizer.lr == compose_cfg(f"train/optimizer={optimizer}").train.optimizer.lr  # left alone


@pytest.mark.parametrize(
    ("optimizer", "default", "low", "high"), [("sgd", 5e-5, 1e-5, 1e-3), ("adamw", 0.05, 0.01, 1.0)]
)
def test_weight_decay_default_and_range_follow_the_optimizer(optimizer, default, low, high):
    """AdamW decays by lr x weight_decay per step: SGD's 5e-5 there would be no decay at all."""
    cfg = compose_cfg(f"train/optimizer={optimizer}")
    assert cfg.train.optimizer.weight_decay == default
    wd = resolve_hparams(cfg.search.hparams, cfg)["train.optimizer.weight_decay"]
    assert (wd["low"], wd["high"]) == (low, high) and wd["log"] is True
    module = make_module(cfg, decode(TINY_ARCH), 10)
    optimizer = module.optimizer_factory(param_groups(module.model, module.weight_decay))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [default, 0.0]


@pytest.mark.parametrize(
    ("key", "dist", "phrase"),
    [
        ("train.nope", {"type": "float", "low": 0.1, "high": 1}, "train.nope is not a key of the configuration"),
        ("train.dropout", {"type": "float", "low": 0.5, "high": 0.1}, "needs low < high"),
        ("train.dropout", {"type": "float", "low": 0, "high": 0.5, "log": True}, "low > 0 with log: true"),
        ("train.label_smoothing", {"type": "categorical", "choices": []}, "non-empty choices"),
        ("train.dropout", {"type": "gauss", "low": 0, "high": 1}, "type 'gauss' is not one of float, int, categorical"),
        ("train.epochs", {"type": "int", "low": 1, "high": 3, "relative": True}, "relative: true needs type float"),
        (
            "train.label_smoothing",
            {"type": "float", "low": 1, "high": 2, "relative": True},
            "positive configured value (it is 0.0)",
        ),
    ],
)
def test_bad_hyperparameter_specs_name_the_key_and_the_fix(key, dist, phrase):
    cfg = compose_cfg()
    with pytest.raises(NasError, match=re.escape("search.hparams") + ".*" + re.escape(phrase)):
        resolve_hparams({key: dist}, cfg)
