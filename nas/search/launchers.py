"""Where the search's worker loops run: ``search.launcher``, a config group (``conf/search/launcher/``).

Every launcher runs the same worker (``python -m nas.search ... search.role=worker``, sharing the study
through its storage and the runs through MLflow); they differ in who places and restarts it: ``local`` starts
processes on this machine (one group per GPU), ``ray`` (:mod:`nas.search.ray_launcher`) hands them to a Ray
cluster. A new launcher is a YAML file naming its class (``_target_``) and arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig

from nas.errors import NasError
from nas.search import workers
from nas.search.study import instantiate_group
from nas.search.workers import WorkerPlan


class StartedWorkers(Protocol):
    """Workers under way: ``workers`` each have ``plan``, ``errors`` (their ``error:`` lines) and ``deaths``
    (how an attempt ended when it did not exit by itself: killed, its node died)."""

    workers: list[Any]

    def wait(self, forward: str | None = None) -> list[int]:
        """Their exit codes once all have ended; ``forward``: a signal name to pass on first."""
        ...


class Launcher(Protocol):
    def plan(self, cfg: DictConfig) -> list[WorkerPlan]:
        """The workers a search runs (none: the trials run in this process)."""
        ...

    def check(self, cfg: DictConfig, plans: list[WorkerPlan]) -> None:
        """Refuse what cannot work (one line naming the fix), before any data is loaded."""
        ...

    def describe(self, plans: list[WorkerPlan]) -> str: ...

    def start(self, cfg: DictConfig, plans: list[WorkerPlan], folder: Path, extra: Sequence[str]) -> StartedWorkers:
        """Start the workers of ``cfg`` (``extra``: overrides, e.g. ``search.phase=finalists``)."""
        ...


class LocalWorkers:
    def __init__(self, started: list[workers.Worker]) -> None:
        self.workers = started

    def wait(self, forward: str | None = None) -> list[int]:
        return workers.wait_all(self.workers, forward=forward)


class LocalLauncher:
    """Processes on this machine: ``search.workers`` on the CPU, or ``search.trials_per_gpu`` per GPU of
    ``search.gpus`` (each group with its own ``CUDA_VISIBLE_DEVICES``)."""

    def plan(self, cfg: DictConfig) -> list[WorkerPlan]:
        plans = workers.plan(cfg)
        return plans if workers.needs_processes(plans) else []

    def check(self, cfg: DictConfig, plans: list[WorkerPlan]) -> None:
        return None

    def describe(self, plans: list[WorkerPlan]) -> str:
        where = ", ".join(f"GPU {p.gpu}" if p.gpu is not None else "CPU" for p in plans)
        return f"starting {len(plans)} worker processes ({where})"

    def start(self, cfg: DictConfig, plans: list[WorkerPlan], folder: Path, extra: Sequence[str]) -> LocalWorkers:
        return LocalWorkers(workers.spawn(cfg, plans, folder, extra))


def make_launcher(cfg: DictConfig) -> Launcher:
    """The configured launcher (``search.launcher``: a group option, or its name); one that cannot be made is
    one line."""
    if cfg.search.get("launcher") is None:
        return LocalLauncher()
    launcher = instantiate_group(cfg, "launcher", _convert_="all")
    if not callable(getattr(launcher, "start", None)):
        raise NasError(f"search.launcher: {type(launcher).__name__} is not a launcher (it has no start method)")
    return launcher
