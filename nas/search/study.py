"""Creating, resuming and counting an Optuna study: storage, sampler, pruner, yardsticks."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from nas.errors import NasError
from nas.space import Space
from nas.train.run import recipe

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SAMPLERS = ("tpe", "nsga2", "random")
PRUNERS = ("hyperband", "median", "none")
OBJECTIVES = ("accuracy", "mnas")


def mask_url(url: str) -> str:
    """The storage URL with any password replaced, for logs and MLflow params."""
    if "://" not in url or "@" not in url:
        return url
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("://", 1)[0] + "://***"


def study_name(cfg: DictConfig, space: Space) -> str:
    return cfg.study.name or f"{space.name}-{cfg.data.name}"


def is_multi_objective(cfg: DictConfig) -> bool:
    return cfg.search.sampler == "nsga2"


def directions(cfg: DictConfig) -> list[str]:
    return ["maximize", "minimize"] if is_multi_objective(cfg) else ["maximize"]


def check_search_cfg(cfg: DictConfig) -> None:
    s = cfg.search
    if s.sampler not in SAMPLERS:
        raise NasError(f"search.sampler={s.sampler!r} is not one of {', '.join(SAMPLERS)}")
    if s.pruner not in PRUNERS:
        raise NasError(f"search.pruner={s.pruner!r} is not one of {', '.join(PRUNERS)}")
    if s.objective not in OBJECTIVES:
        raise NasError(f"search.objective={s.objective!r} is not one of {', '.join(OBJECTIVES)}")
    if s.objective == "mnas" and cfg.latency.budget_ms is None:
        raise NasError("search.objective=mnas needs a latency target: set latency.budget_ms")
    if s.objective == "mnas" and is_multi_objective(cfg):
        raise NasError("search.objective=mnas is a single objective; use it with search.sampler=tpe or random")
    budget = cfg.latency.budget_ms
    if budget is not None and not (isinstance(budget, int | float) and budget > 0):
        raise NasError(f"latency.budget_ms={budget!r} must be a positive number of milliseconds (or null)")


def make_sampler(cfg: DictConfig, resumed_at: int = 0) -> optuna.samplers.BaseSampler:
    """Options set explicitly: Optuna 5 changed TPE's defaults (multivariate, constant liar).

    A resumed study must not replay the random draws of its first session (that would repeat
    finished architectures), so the seed also depends on how many trials the study holds.
    """
    s = cfg.search
    seed = int(cfg.seed) + 1_000_003 * resumed_at + 7_919 * int(s.get("worker_index", 0))
    if s.sampler == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constant_liar=True, n_startup_trials=int(s.startup_trials)
        )
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=int(s.get("population_size", 20)))
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(cfg: DictConfig) -> optuna.pruners.BasePruner:
    s = cfg.search
    if s.pruner == "none" or is_multi_objective(cfg):  # Optuna cannot prune multi-objective trials
        return optuna.pruners.NopPruner()
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=int(s.startup_trials), n_warmup_steps=0)
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(int(cfg.train.epochs), 1))


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


def space_fingerprint(space: Space) -> str:
    fields = asdict(space)
    fields.pop("path", None)
    fields.pop("name", None)
    fields.pop("description", None)
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def study_identity(cfg: DictConfig, space: Space, latency_key: dict[str, Any]) -> dict[str, Any]:
    """What a study must keep across resumes: changing any of these mixes incomparable trials."""
    return {
        "space": space.name,
        "space_fingerprint": space_fingerprint(space),
        "objective": cfg.search.objective,
        "directions": directions(cfg),
        "budget_ms": cfg.latency.budget_ms,
        "latency_device": latency_key.get("device_name"),
        "latency_batch": latency_key.get("batch_size"),
        "data": cfg.data.name,
        **recipe(cfg),
    }


def open_study(
    cfg: DictConfig, space: Space, identity: dict[str, Any], storage: RDBStorage
) -> tuple[optuna.Study, bool]:
    """Create the study or resume it; refuse to resume one created for another space or objective."""
    name = study_name(cfg, space)
    existing = name in optuna.get_all_study_names(storage)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=make_sampler(cfg),
        pruner=make_pruner(cfg),
        directions=directions(cfg),
        load_if_exists=True,
    )
    if existing or cfg.search.get("worker_index", 0):
        study.sampler = make_sampler(cfg, resumed_at=len(study.get_trials(deepcopy=False)))
    stored = study.user_attrs.get("identity")
    if stored is None:
        study.set_user_attr("identity", identity)
    else:
        # Keys a study was created without (an older version of nas) are not held against it.
        diffs = [f"{k}: {stored[k]!r} -> {v!r}" for k, v in identity.items() if k in stored and stored[k] != v]
        if diffs:
            raise NasError(
                f"study {name!r} was created with a different setup ({'; '.join(diffs)}). Resume it with the "
                f"original settings, or start a new study with study.name=NEW_NAME"
            )
    return study, not existing


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def is_surplus(study: optuna.Study, number: int, target: int) -> bool:
    """Whether trial ``number`` would exceed ``target``: the trials numbered before it that finished or are
    still running already make up the target. Trial numbers are assigned atomically by the storage, so
    concurrent workers agree on who is surplus."""
    before = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    return sum(t.number < number for t in before) >= target


def enqueue_references(study: optuna.Study, space: Space) -> list[str]:
    """The space's hand-designed networks run first (default recipe), as yardsticks for every study."""
    names = []
    for name, arch in space.reference_archs().items():
        study.enqueue_trial({}, user_attrs={"reference": name, "arch": arch.encode()}, skip_if_exists=False)
        names.append(name)
    return names
