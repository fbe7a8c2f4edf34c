"""The hyperparameter half of the search: config keys sampled beside the architecture."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from nas.errors import NasError

_MISSING = object()


def resolve_hparams(spec: Mapping[str, Any], cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Check every searched key and distribution; ranges marked ``relative: true`` become absolute.

    A relative range is a pair of factors of the key's configured value, so it follows the recipe:
    ``train.optimizer.lr: {low: 0.1, high: 4, relative: true}`` searches 0.01-0.4 around SGD's 0.1
    and 0.0003-0.012 around AdamW's 0.003, where one absolute range would suit only one of them.
    """
    resolved: dict[str, dict[str, Any]] = {}
    for key, dist in spec.items():
        current = OmegaConf.select(cfg, key, default=_MISSING)
        if current is _MISSING:
            raise NasError(f"search.hparams: {key} is not a key of the configuration (e.g. train.optimizer.lr)")
        dist = dict(dist)
        kind = dist.get("type")
        if kind in ("float", "int"):
            low, high = dist.get("low"), dist.get("high")
            if dist.pop("relative", False):
                positive = isinstance(current, int | float) and current > 0
                if kind != "float" or not positive or low is None or high is None:
                    raise NasError(
                        f"search.hparams.{key}: relative: true needs type float, low/high factors and a positive "
                        f"configured value (it is {current!r})"
                    )
                # 12 significant digits: 0.1 x 0.1 is 0.01, not 0.010000000000000002, in the study's records
                low, high = (float(f"{factor * current:.12g}") for factor in (low, high))
                dist.update(low=low, high=high)
            if low is None or high is None or not low < high or (dist.get("log") and low <= 0):
                raise NasError(f"search.hparams.{key}: needs low < high (and low > 0 with log: true)")
        elif kind == "categorical":
            if not dist.get("choices"):
                raise NasError(f"search.hparams.{key}: categorical needs a non-empty choices list")
        else:
            raise NasError(f"search.hparams.{key}: type {kind!r} is not one of float, int, categorical")
        resolved[key] = dist
    return resolved


def sample_hparams(trial: optuna.Trial, spec: Mapping[str, Any]) -> dict[str, Any]:
    """One value per searched key (a resolved spec), as named Optuna parameters (plots, MLflow)."""
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
