"""Several trials at once: worker processes sharing the study through its storage.

The main process prepares everything once (study, MLflow parent run and
schema, yardsticks, latency table), then starts ``python -m nas.search
search.role=worker`` processes with the same configuration, one group per
GPU (``CUDA_VISIBLE_DEVICES``), and waits. Workers on other machines join
the same way with a shared PostgreSQL storage and MLflow server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from nas.errors import NasError


@dataclass(frozen=True)
class WorkerPlan:
    index: int
    gpu: int | None  # None: not pinned (CPU, or every visible GPU)


def gpu_ids(spec: object, available: int) -> list[int] | None:
    """``search.gpus``: null -> no pinning; ``all``; ``N`` (the first N); ``[0, 2]`` (those)."""
    if spec is None:
        return None
    if spec == "all":
        ids = list(range(available))
    elif isinstance(spec, int) and not isinstance(spec, bool):
        ids = list(range(spec))
    elif isinstance(spec, list | tuple | ListConfig):
        ids = [int(i) for i in spec]
    else:
        raise NasError(f"search.gpus={spec!r} must be null, all, a count or a list such as [0,2]")
    if not ids:
        raise NasError("search.gpus selects no GPU")
    missing = [i for i in ids if not 0 <= i < available]
    if missing:
        raise NasError(f"search.gpus asks for GPU {missing} but {available} CUDA device(s) are visible")
    return ids


def plan(cfg: DictConfig, available_gpus: int | None = None) -> list[WorkerPlan]:
    s = cfg.search
    available = torch.cuda.device_count() if available_gpus is None else available_gpus
    per_gpu, workers = int(s.trials_per_gpu), int(s.workers)
    if per_gpu < 1 or workers < 1:
        raise NasError("search.workers and search.trials_per_gpu must be >= 1")
    ids = gpu_ids(s.gpus, available)
    if ids is None and per_gpu > 1:
        if available == 0:
            raise NasError("search.trials_per_gpu > 1 needs a GPU; on CPU use search.workers=N")
        ids = [0]
    if ids is None:
        return [WorkerPlan(i, None) for i in range(workers)]
    return [WorkerPlan(len(ids) * k + n, gpu) for k in range(per_gpu) for n, gpu in enumerate(ids)]


def check_latency_for_concurrency(cfg: DictConfig, workers: int) -> None:
    """A measurement taken while other trials load the device is wrong: concurrent workers use the table."""
    if workers > 1 and cfg.latency.estimator == "measure":
        raise NasError(
            f"{workers} concurrent workers would disturb each other's latency measurements; use the lookup "
            f"table (latency.estimator=table, built once before the workers start)"
        )


def spawn(cfg: DictConfig, plans: list[WorkerPlan], folder: Path) -> list[subprocess.Popen]:
    """Start the workers with this exact (resolved) configuration."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "worker.yaml"
    OmegaConf.save(cfg, config, resolve=True)
    procs = []
    # Split the CPU cores: k workers each using every core oversubscribe the machine (measured on 2 cores:
    # 2 workers x 2 threads ran 0.44x as many trials per hour as one worker).
    threads = str(max(1, (os.cpu_count() or 1) // len(plans)))
    for p in plans:
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", threads)
        env.setdefault("MKL_NUM_THREADS", threads)
        if p.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(p.gpu)
        cmd = [
            sys.executable,
            "-m",
            "nas.search",
            "--config-path",
            str(folder.resolve()),
            "--config-name",
            "worker",
            "search.role=worker",
            "search.workers=1",
            "search.gpus=null",
            "search.trials_per_gpu=1",
            f"search.worker_index={p.index}",
            f"hydra.run.dir={folder / f'worker-{p.index}'}",
        ]
        procs.append(subprocess.Popen(cmd, env=env))
    return procs


def wait_all(procs: list[subprocess.Popen], forward: str | None = None, timeout: float = 120) -> list[int]:
    """Wait for every worker; with ``forward`` (a signal name) first pass that signal on."""
    if forward:
        for p in procs:
            if p.poll() is None:
                p.send_signal(getattr(signal, forward))
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout if forward else None))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes
