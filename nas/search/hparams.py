"""The hyperparameter half of the search: config keys sampled beside the architecture."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from nas.errors import NasError

_MISSING = object()


def validate_hparams(spec: Mapping[str, Any], cfg: DictConfig) -> None:
    """Every searched key must exist in the config and have a well-formed distribution."""
    for key, dist in spec.items():
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise NasError(f"search.hparams: {key} is not a key of the configuration (e.g. train.optimizer.lr)")
        kind = dist.get("type")
        if kind in ("float", "int"):
            low, high = dist.get("low"), dist.get("high")
            if low is None or high is None or not low < high or (dist.get("log") and low <= 0):
                raise NasError(f"search.hparams.{key}: needs low < high (and low > 0 with log: true)")
        elif kind == "categorical":
            if not dist.get("choices"):
                raise NasError(f"search.hparams.{key}: categorical needs a non-empty choices list")
        else:
            raise NasError(f"search.hparams.{key}: type {kind!r} is not one of float, int, categorical")


def sample_hparams(trial: optuna.Trial, spec: Mapping[str, Any]) -> dict[str, Any]:
    """One value per searched key, as named Optuna parameters (so they show up in plots and MLflow)."""
    values: dict[str, Any] = {}
    for key, dist in spec.items():
        kind = dist["type"]
        if kind == "float":
            values[key] = trial.suggest_float(key, dist["low"], dist["high"], log=bool(dist.get("log", False)))
        elif kind == "int":
            values[key] = trial.suggest_int(key, dist["low"], dist["high"], log=bool(dist.get("log", False)))
        else:
            values[key] = trial.suggest_categorical(key, list(dist["choices"]))
    return values


def apply_hparams(cfg: DictConfig, values: Mapping[str, Any]) -> DictConfig:
    """A copy of ``cfg`` with the sampled values written at their keys."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key, value in values.items():
        OmegaConf.update(out, key, value, merge=False)
    return out
