"""Creating, resuming and counting an Optuna study: storage, sampler, pruner, identity, yardsticks."""

from __future__ import annotations

import hashlib
import inspect
import os
import socket
from pathlib import Path
from typing import Any

import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from nas import trial_states
from nas.cli import CONF_DIR
from nas.errors import NasError
from nas.objectives import StudyObjective
from nas.search.pruning import EvidencePruner
from nas.space import Space
from nas.studies import identity_diffs
from nas.train.run import recipe

# Config groups under search/: a YAML file per class (an Optuna sampler or pruner, a launcher of the workers).
GROUPS = {"sampler": "an Optuna sampler", "pruner": "an Optuna pruner", "launcher": "a launcher"}


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / "search" / group).glob("*.yaml"))


def with_group_files(cfg: DictConfig) -> DictConfig:
    """Accept the short spelling ``search.sampler=gp`` beside Hydra's ``search/sampler=gp``.

    Hydra's group override puts the file's contents at ``search.sampler``; a plain value override
    replaces that node with the name, which is looked up here in the shipped group folder.
    """
    if all(not isinstance(cfg.search.get(g), str) for g in GROUPS):
        return cfg
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for group in GROUPS:
        name = out.search.get(group)
        if not isinstance(name, str):
            continue
        path = Path(CONF_DIR) / "search" / group / f"{name}.yaml"
        if not path.is_file():
            raise NasError(
                f"search.{group}={name!r} is not one of {', '.join(group_options(group))}; add a file "
                f"search/{group}/{name}.yaml to a config folder (hydra.searchpath) and pick it with "
                f"search/{group}={name}"
            )
        out.search[group] = OmegaConf.load(path)
    return out


def _target(cfg: DictConfig, group: str) -> str:
    node = cfg.search.get(group)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise NasError(
            f"search.{group} must name {GROUPS[group]} class with _target_ (choose one with "
            f"search/{group}=NAME: {', '.join(group_options(group))})"
        )
    return str(node._target_)


def check_search_cfg(cfg: DictConfig) -> None:
    for group in GROUPS:
        _target(cfg, group)
    for key in ("max_consecutive_failures", "max_draws_over_budget", "pruning_warmup_epochs", "startup_trials"):
        value = cfg.search.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise NasError(f"search.{key}={value!r} must be a whole number >= 0")
    timeout = cfg.search.get("join_timeout_s", 600)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
        raise NasError(f"search.join_timeout_s={timeout!r} must be seconds >= 0 (how long a worker waits for the "
                       "main process to prepare the study)")  # fmt: skip
    draws = cfg.search.get("draws_per_trial", 1)
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise NasError(
            f"search.draws_per_trial={draws!r} must be a whole number >= 1 (draws one trial may refuse over the "
            f"latency budget; 1: every draw is a trial)"
        )
    if int(cfg.train.get("devices", 1)) != 1 or int(cfg.train.get("num_nodes", 1)) != 1:
        raise NasError(
            "a search trains each trial on one device: drop train.devices/train.num_nodes (they are for "
            "nas.train and nas.retrain), and spread trials with search.workers=N or search.gpus=all"
        )


def instantiate_group(cfg: DictConfig, group: str, **kwargs: Any) -> Any:
    """The object of ``search.<group>`` (a file of the group, or its name); one that cannot be made is one line,
    the object's own refusal (a bad argument it names) as it said it."""
    target = _target(cfg, group)
    try:
        return instantiate(cfg.search[group], **kwargs)
    except Exception as exc:  # hydra wraps import errors and bad arguments in InstantiationException
        if isinstance(exc.__cause__, NasError):
            raise exc.__cause__ from None
        reason = str(exc).splitlines()[0][:300]
        raise NasError(f"search.{group}: cannot create {target}: {reason}") from None


def worker_index(cfg: DictConfig) -> int:
    """Spawned workers are numbered by the main process. A worker started by hand on another machine
    (``search.role=worker`` with no index) takes a number from its host and process, so that two of them
    starting at the same study size never draw the same sequence."""
    index = cfg.search.get("worker_index")
    if index is not None:
        return int(index)
    if cfg.search.get("role") != "worker":
        return 0
    digest = hashlib.blake2b(f"{socket.gethostname()}|{os.getpid()}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big")


def make_sampler(cfg: DictConfig, resumed_at: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded.

    A resumed study must not replay the random draws of its first session (that would repeat
    finished architectures), so the seed also depends on how many trials the study holds, and
    on the worker's index so concurrent workers draw differently.
    """
    seed = (int(cfg.seed) + 1_000_003 * resumed_at + 7_919 * worker_index(cfg)) % 2**32  # numpy takes < 2^32
    target = _target(cfg, "sampler")
    kwargs: dict[str, Any] = {}
    cls = instantiate_group(cfg, "sampler", _partial_=True)
    if "seed" in inspect.signature(cls).parameters:
        kwargs["seed"] = seed
    sampler = cls(**kwargs)
    if not isinstance(sampler, optuna.samplers.BaseSampler):
        raise NasError(f"search.sampler: {target} is not an Optuna sampler (optuna.samplers.BaseSampler)")
    return sampler


def make_pruner(cfg: DictConfig, objective: StudyObjective) -> optuna.pruners.BasePruner:
    """The configured pruner behind :class:`EvidencePruner`; none where the objective cannot be pruned."""
    pruner = instantiate_group(cfg, "pruner")
    if not isinstance(pruner, optuna.pruners.BasePruner):
        raise NasError(f"search.pruner: {_target(cfg, 'pruner')} is not an Optuna pruner (optuna.pruners.BasePruner)")
    if not objective.can_prune or isinstance(pruner, optuna.pruners.NopPruner):
        return optuna.pruners.NopPruner()
    return EvidencePruner(pruner, int(cfg.search.startup_trials), int(cfg.search.pruning_warmup_epochs))


def study_name(cfg: DictConfig, space: Space, data_fingerprint: str) -> str:
    """``<space>-<data>``; for a user's folder also the data's fingerprint, so two folders never share a study."""
    if cfg.study.name:
        return str(cfg.study.name)
    name = f"{space.name}-{cfg.data.name}"
    return f"{name}-{data_fingerprint[:8]}" if cfg.data.get("name_with_fingerprint") else name


def study_identity(
    cfg: DictConfig,
    space: Space,
    objective: StudyObjective,
    latency: dict[str, Any],
    data: dict[str, Any],
    hparams: dict[str, Any],
) -> dict[str, Any]:
    """What a study must keep across resumes: changing any of these makes trials incomparable.

    Keys are the configuration's own names where there is one, so a refusal names what to change.
    ``latency`` is the estimator's settings (``key_fields`` plus the estimator); ``data`` holds
    ``root``, ``fingerprint`` and ``image_size`` of the loaded data.
    """
    return {
        "space": space.name,
        "space_fingerprint": space.fingerprint(),
        **objective.settings(),  # objective, budget_ms (and search.mnas_exponent): read back by objective_of()
        "directions": list(objective.directions),
        "search.hparams": OmegaConf.to_container(OmegaConf.create(hparams), resolve=True),
        "latency_device": latency.get("device_name"),
        "latency.device": latency.get("device"),  # cpu | cuda: where nas.retrain measures the winner
        "latency_batch": latency.get("batch_size"),
        "latency.mode": latency.get("mode"),
        "latency.threads": latency.get("threads"),
        "latency.estimator": latency.get("estimator"),
        "latency.runtime": latency.get("runtime"),  # by name: resuming in another runtime is refused
        "latency.runtime_config": latency.get("runtime_config"),  # what nas.retrain measures the winner in
        "latency.target": latency.get("target"),  # the agent's address (may move: the device is latency_device)
        # The calibration's network count: its fit is kept with the study (nas.studies.LATENCY_ATTR).
        "latency.calibrate": int(cfg.latency.calibrate) if latency.get("estimator") == "table" else None,
        "data": cfg.data.name,
        "data.root": data.get("root"),
        "data.fingerprint": data.get("fingerprint"),
        "data.image_size": data.get("image_size"),
        "data.val_size": cfg.data.get("val_size"),
        "data.split_seed": cfg.data.get("split_seed"),
        "data.repeat": cfg.data.get("repeat", 1),  # passes per epoch: part of what an epoch means
        "data.augment": cfg.data.get("augment", "auto"),
        "data.resized_crop": OmegaConf.to_container(cfg.data.resized_crop) if cfg.data.get("resized_crop") else None,
        "train.epochs": int(cfg.train.epochs),
        "train.batch_size": int(cfg.train.batch_size),
        **recipe(cfg),
    }


def open_study(
    cfg: DictConfig, name: str, identity: dict[str, Any], storage: RDBStorage, objective: StudyObjective
) -> tuple[optuna.Study, bool]:
    """Create the study or resume it; refuse to resume one whose trials would not compare with new ones."""
    existing = name in optuna.get_all_study_names(storage)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=make_sampler(cfg),
        pruner=make_pruner(cfg, objective),
        directions=list(objective.directions),
        load_if_exists=True,
    )
    if existing and list(study.directions) != [optuna.study.StudyDirection[d.upper()] for d in objective.directions]:
        raise NasError(
            f"study {name!r} was created with {len(study.directions)} objective(s) and search.objective="
            f"{objective.name} has {len(objective.directions)}. Resume it with the original search.objective, "
            f"or start a new study with study.name=NEW_NAME"
        )
    if existing or worker_index(cfg):
        study.sampler = make_sampler(cfg, resumed_at=len(study.get_trials(deepcopy=False)))
    stored = study.user_attrs.get("identity")
    if stored is None:
        study.set_user_attr("identity", identity)
    else:
        diffs = identity_diffs(stored, identity)
        if diffs:
            raise NasError(
                f"study {name!r} was created with a different setup ({'; '.join(diffs)}). Resume it with the "
                f"original settings, or start a new study with study.name=NEW_NAME"
            )
    return study, not existing


def is_surplus(study: optuna.Study, number: int, target: int) -> bool:
    """Whether training trial ``number`` could make the study exceed ``target`` trained networks.

    Called when a trial is about to train. Counted against it: every trial numbered before it that
    was trained, or is still running or queued (it may yet train). Trial numbers are assigned
    atomically by the storage and a trial never counts a later one, so concurrent workers never
    train more than ``target`` together; a trial that turns out surplus leaves the loop to ask again
    once the running ones have ended.
    """
    before = study.get_trials(
        deepcopy=False, states=(*trial_states.FINISHED_STATES, TrialState.RUNNING, TrialState.WAITING)
    )
    claimed = sum(
        1
        for t in before
        if t.number < number and (t.state in (TrialState.RUNNING, TrialState.WAITING) or trial_states.is_trained(t))
    )
    return claimed >= target


def enqueue_references(study: optuna.Study, space: Space) -> list[str]:
    """The space's hand-designed networks run first (default recipe), as yardsticks for every study."""
    names = []
    for name, arch in space.reference_archs().items():
        study.enqueue_trial({}, user_attrs={"reference": name, "arch": arch.encode()}, skip_if_exists=False)
        names.append(name)
    return names
