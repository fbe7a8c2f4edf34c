"""Studies in a storage, as every entry point sees them: opening the storage, which study is "the latest",
whether two setups compare, and the finalist round's record.

The search writes these, and ``nas.retrain``, ``nas.report`` and the finalist round read them: one
definition here, so that "the latest study" or "the winner" cannot mean two things.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from nas.errors import NasError
from nas.urls import mask_url

FINALISTS_SUFFIX = ".finalists"  # the finalist round's own study: <study>.finalists in the same storage
ROUND_ATTR = "finalist_round"  # on the search study: the round's outcome (winner, tau, settings)
LATENCY_ATTR = "latency_table"  # on the search study: the layer latencies and calibration it predicts with


def make_storage(cfg: DictConfig) -> RDBStorage:
    """An RDB storage with heartbeats, so a worker killed with -9 leaves no trial RUNNING forever."""
    url = str(cfg.study.storage)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}  # wait for a busy database instead of failing
    heartbeat = int(cfg.search.heartbeat_s)
    try:
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat,
            grace_period=2 * heartbeat,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
        )
    except Exception as exc:  # sqlalchemy OperationalError, ArgumentError, missing driver ...
        reason = str(exc).splitlines()[0][:300]
        raise NasError(
            f"cannot open the study storage {mask_url(url)}: {reason}. Check study.storage (for PostgreSQL: "
            f"the server runs and the URL, user and password are right), or use the default "
            f"study.storage=sqlite:///outputs/optuna.db"
        ) from None


def search_study_names(storage: Any) -> list[str]:
    """The searches in a storage: their finalist rounds are studies too, but nobody asks for them by name."""
    return [n for n in optuna.get_all_study_names(storage) if not n.endswith(FINALISTS_SUFFIX)]


def latest_study(storage: Any) -> str:
    summaries = optuna.get_all_study_summaries(storage)
    started = [s for s in summaries if s.datetime_start is not None and not s.study_name.endswith(FINALISTS_SUFFIX)]
    if not started:
        raise NasError("no study with trials in the storage; run python -m nas.search first, or pass arch='...'")
    return max(started, key=lambda s: s.datetime_start).study_name


def load_search_study(cfg: DictConfig, storage: Any) -> optuna.Study:
    """``study.name``, or the latest study; an unknown name is refused with the names there are."""
    name = cfg.study.name or latest_study(storage)
    known = search_study_names(storage)
    if name not in known:
        raise NasError(f"no study named {name!r} in {mask_url(str(cfg.study.storage))}; known: {known}")
    return optuna.load_study(study_name=name, storage=storage)


# Where the study's data and latency device are reached, not what they are (their fingerprint and the device's
# identity are compared): a study resumes after the files moved or the agent's tunnel changed port.
ADDRESSES = ("data.root", "latency.target")


def identity_diffs(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting of ``current`` that changed. Keys a study was created without
    (an older version of nas) are not held against it, nor are the ADDRESSES."""
    diffs = [
        f"{k}: {stored[k]!r} -> {v!r}"
        for k, v in current.items()
        if k in stored and stored[k] != v and k not in ADDRESSES
    ]
    if any(d.startswith("data.fingerprint") for d in diffs) and stored.get("data.root") != current.get("data.root"):
        diffs.insert(0, f"data.root: {stored.get('data.root')!r} -> {current.get('data.root')!r}")
    return diffs


def finalist_round(study: optuna.Study) -> dict[str, Any] | None:
    """The outcome the search recorded for its last finalist round: ``winner`` (a trial number, or None when
    no finalist's measured latency met the budget), ``trained`` (networks in the study then), ``kendall_tau``,
    ``fidelity``, ``epochs``, ``seeds``, ``round_seeds``, ``finalist_hparams``, ``verdict_alpha``, ``candidates``
    (each with its ``verdicts``)."""
    return study.user_attrs.get(ROUND_ATTR)


def stored_latency_table(storage: Any, name: str) -> dict[str, Any] | None:
    """The layer latencies and calibration study ``name`` predicts with (``latency.estimator=table``), when the
    study exists and has them; read before the study is opened, so that nothing is measured again for it."""
    if name not in optuna.get_all_study_names(storage):
        return None
    return optuna.load_study(study_name=name, storage=storage).user_attrs.get(LATENCY_ATTR)
