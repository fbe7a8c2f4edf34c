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
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
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


def measures_here(latency: DictConfig) -> bool:
    """Whether trials measure latency on this machine: an agent on another device (latency.target) is not
    disturbed by training here; an explicit latency.verify_band measures some draws with the table."""
    if (latency.get("target") or "local") != "local":
        return False
    band = latency.get("verify_band", "auto")
    verified = latency.estimator == "table" and latency.get("budget_ms") is not None and band not in ("auto", 0)
    return latency.estimator == "measure" or verified


def check_latency_for_concurrency(cfg: DictConfig, workers: int) -> None:
    """A measurement taken while other trials load the device is wrong: concurrent workers use the table."""
    if workers > 1 and measures_here(cfg.latency):
        raise NasError(
            f"{workers} concurrent workers would disturb each other's latency measurements; use the lookup "
            f"table (latency.estimator=table, built once before the workers start) without latency.verify_band, "
            "or measure on the target device (latency.target)"
        )
    if cfg.search.get("role") == "worker" and measures_here(cfg.latency):
        # A hand-started worker cannot see who else trains on its device: say what is at stake, once.
        print(
            f"warning: worker {cfg.search.get('worker_index', 0)} measures every candidate's latency "
            "(latency.estimator=measure): figures taken while other workers train on the same device are wrong; "
            "with several workers per machine use latency.estimator=table",
            file=sys.stderr,
            flush=True,
        )


SECRET_ENV = {"study.storage": "NAS_STUDY_STORAGE", "mlflow.tracking_uri": "NAS_MLFLOW_TRACKING_URI"}


def needs_processes(plans: list[WorkerPlan]) -> bool:
    """Several trials at once, or one pinned to a chosen GPU (this process may already hold another one)."""
    return len(plans) > 1 or any(p.gpu is not None for p in plans)


def worker_env(plan: WorkerPlan, workers: int, base: dict[str, str], secrets: dict[str, str]) -> dict[str, str]:
    """The worker's environment: its GPU, its share of the CPU cores, and the URLs that may hold passwords.

    ``search.gpus`` indexes the GPUs this process can see; under a scheduler's allocation
    (``CUDA_VISIBLE_DEVICES=2,3``) index 0 is physical GPU 2, so the worker gets ``2``, not ``0``.
    """
    env = dict(base)
    # Split the CPU cores: k workers each using every core oversubscribe the machine (measured on 2 cores:
    # 2 workers x 2 threads ran 0.44x as many trials per hour as one worker).
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    env.setdefault("OMP_NUM_THREADS", threads)
    env.setdefault("MKL_NUM_THREADS", threads)
    if plan.gpu is not None:
        visible = [v.strip() for v in base.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[plan.gpu] if visible else str(plan.gpu)
    env.update(secret_env(secrets))
    return env


def worker_config(cfg: DictConfig) -> tuple[str, dict[str, str]]:
    """The resolved configuration for the workers as YAML, with the storage and tracking URLs replaced by
    environment lookups (a password never lands in a file, a task argument or a log), and the real values for
    the workers' environment."""
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    secrets = {}
    for key, var in SECRET_ENV.items():
        secrets[key] = str(OmegaConf.select(resolved, key))
        OmegaConf.update(resolved, key, f"${{oc.env:{var}}}", merge=False)
    return OmegaConf.to_yaml(resolved), secrets


def write_worker_config(cfg: DictConfig, folder: Path) -> dict[str, str]:
    """``worker.yaml`` in ``folder`` (see :func:`worker_config`); returns the real values for the environment."""
    folder.mkdir(parents=True, exist_ok=True)
    text, secrets = worker_config(cfg)
    (folder / "worker.yaml").write_text(text)
    return secrets


def secret_env(secrets: dict[str, str]) -> dict[str, str]:
    """The environment variables ``worker.yaml`` reads the storage and tracking URLs from."""
    return {SECRET_ENV[key]: value for key, value in secrets.items()}


def worker_command(config_dir: Path, index: int, run_dir: Path, extra: Sequence[str] = ()) -> list[str]:
    """``python -m nas.search`` as a worker of this exact configuration (``config_dir/worker.yaml``)."""
    return [
        sys.executable,
        "-m",
        "nas.search",
        "--config-path",
        str(config_dir.resolve()),
        "--config-name",
        "worker",
        "search.role=worker",
        "search.workers=1",
        "search.gpus=null",
        "search.trials_per_gpu=1",
        f"search.worker_index={index}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


@dataclass
class Worker:
    plan: WorkerPlan
    process: subprocess.Popen
    errors: list[str] = field(default_factory=list)  # the worker's "error: ..." lines, for the main summary
    relay: threading.Thread | None = None
    deaths: list[str] = field(default_factory=list)  # how it ended when it did not exit by itself


def keep_error(line: str, errors: list[str]) -> None:
    """A worker's ``error: ...`` line, for the main summary."""
    if line.startswith("error: "):
        errors.append(line.removeprefix("error: ").strip())


def relay_line(index: int, line: str, errors: list[str]) -> None:
    """A worker's stderr line on this process's stderr, prefixed with its index; its error lines kept."""
    keep_error(line, errors)
    sys.stderr.write(f"[worker {index}] {line}")
    sys.stderr.flush()


def _relay(worker: Worker) -> None:
    assert worker.process.stderr is not None
    for line in worker.process.stderr:
        relay_line(worker.plan.index, line, worker.errors)


def spawn(cfg: DictConfig, plans: list[WorkerPlan], folder: Path, extra: Sequence[str] = ()) -> list[Worker]:
    """Start the workers with this exact (resolved) configuration, and ``extra`` overrides."""
    secrets = write_worker_config(cfg, folder)
    started = []
    for p in plans:
        cmd = worker_command(folder, p.index, folder / f"worker-{p.index}", extra)
        env = worker_env(p, len(plans), dict(os.environ), secrets)
        process = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, bufsize=1)
        worker = Worker(p, process)
        worker.relay = threading.Thread(target=_relay, args=(worker,), daemon=True)
        worker.relay.start()
        started.append(worker)
    return started


def wait_all(started: list[Worker], forward: str | None = None, timeout: float = 120) -> list[int]:
    """Wait for every worker; with ``forward`` (a signal name) first pass that signal on. A worker killed by a
    signal it was not sent says so in ``deaths``."""
    if forward:
        for w in started:
            if w.process.poll() is None:
                w.process.send_signal(getattr(signal, forward))
    codes = []
    for w in started:
        try:
            codes.append(w.process.wait(timeout=timeout if forward else None))
        except subprocess.TimeoutExpired:
            w.process.kill()
            codes.append(w.process.wait())
        if codes[-1] < 0 and not forward:
            w.deaths.append(f"killed by {signal.Signals(-codes[-1]).name}")
        if w.relay is not None:
            w.relay.join(timeout=10)
    return codes
