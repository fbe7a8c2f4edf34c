"""The search's workers scheduled by a Ray cluster (``search/launcher=ray``; ``pip install -e '.[ray]'``).

The main process prepares the study, its MLflow run and the latency table once (a table study keeps its own
copy, which every worker predicts with), then hands ``search.workers`` worker loops to Ray as tasks with
``num_gpus = 1 / search.trials_per_gpu`` on a cluster with GPUs, spread over its nodes. Each task runs the
same worker process the local launcher starts (``python -m nas.search ... search.role=worker``) on whichever
node Ray placed it, and streams its lines back. Ray places; the study coordinates: a worker whose node or
process dies is started again through Ray (``max_restarts``), and its trial is retried through the study's
heartbeat, as when a local worker is killed. Passwords never enter what Ray records (task arguments, runtime
environment, logs, dashboard): the workers' configuration reads the storage and tracking URLs from the
environment, whose values travel through Ray's object store.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from nas.errors import NasError
from nas.search import workers
from nas.search.workers import WorkerPlan
from nas.urls import mask_url

# Credentials a worker may need that the main process holds in its environment (libpq's, MLflow's): they travel
# with the storage and tracking URLs, through the object store.
CREDENTIAL_ENV = ("PGPASSWORD", "PGUSER", "PGPASSFILE", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                  "MLFLOW_TRACKING_TOKEN")  # fmt: skip
STOP_WAIT_S = 120  # after an interrupt is passed on, before the workers are cancelled by force


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise NasError(
            "search.launcher=ray needs Ray on this machine and every node: pip install -e '.[ray]'"
        ) from None
    return ray


def file_stores(cfg: DictConfig) -> list[str]:
    """The study storage and tracking store of ``cfg`` that are files on this machine (SQLite, a folder)."""
    found = []
    storage = str(cfg.study.storage)
    if storage.startswith("sqlite"):
        found.append(f"study.storage={mask_url(storage)}")
    tracking = str(cfg.mlflow.tracking_uri)
    if tracking.startswith(("sqlite", "file:")) or "://" not in tracking:
        found.append(f"mlflow.tracking_uri={mask_url(tracking)}")
    return found


def other_machines(nodes: list[dict], driver_node: str | None) -> list[str]:
    """Addresses of the alive nodes that are not on this machine (all of them when this process is not on a
    node, as with Ray Client)."""
    alive = [n for n in nodes if n.get("Alive")]
    here = next((n["NodeManagerAddress"] for n in alive if n["NodeID"] == driver_node), None)
    return sorted({n["NodeManagerAddress"] for n in alive if n["NodeManagerAddress"] != here})


def _answers(ray: Any, address: str | None) -> None:
    """Raise OSError when nothing listens at the cluster's address: ``ray.init`` retries such an address for
    minutes. ``auto`` is the cluster this machine last started or joined (a stale record points at nothing)."""
    if address is None:
        return
    target = address.removeprefix("ray://")
    if target == "auto":
        try:  # Ray's own lookup (RAY_ADDRESS, then its record of the current cluster)
            target = ray._private.services.canonicalize_bootstrap_address_or_die("auto")
        except Exception:  # none found: ray.init says so itself
            return
    host, _, port = target.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"{address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    socket.create_connection((host or "127.0.0.1", int(port)), timeout=10).close()


def _die_with_parent() -> None:
    """In the worker process: killed when the Ray task's process dies (its node was lost), never left training
    a trial the study has given to another worker."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _send(lines: Any, item: tuple[int, str, str]) -> bool:
    """One line to the main process; False once its queue is gone (the main process went away)."""
    try:
        lines.put(item)
    except Exception:
        return False
    return True


def _pump(stream: Any, index: int, kind: str, lines: Any, errors: list[str] | None) -> None:
    """Relay a worker's stream; its pipe is drained to the end even when nobody listens any more, so the worker
    never blocks on a full pipe."""
    relaying = True
    for line in stream:
        if errors is not None:
            workers.keep_error(line, errors)
        relaying = relaying and _send(lines, (index, kind, line))


def run_worker(index: int, config_yaml: str, extra: list[str], secrets: dict[str, str], lines: Any,
               cwd: str) -> dict:  # fmt: skip
    """A Ray task: the worker process on this node, its stdout and stderr sent to the main process line by line.
    ``cwd`` is the main process's folder, used where this node has it (relative paths of the configuration)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    folder = Path(tempfile.mkdtemp(prefix=f"nas-worker-{index}-"))
    (folder / "worker.yaml").write_text(config_yaml)
    env = {**os.environ, **secrets, "NAS_WORKER_NODE": node, "PYTHONUNBUFFERED": "1"}
    cmd = workers.worker_command(folder, index, folder / "run", extra)
    here = cwd if Path(cwd).is_dir() else str(folder)
    _send(lines, (index, "stderr", f"started on node {node[:12]} ({socket.gethostname()})\n"))
    proc = subprocess.Popen(cmd, cwd=here, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            bufsize=1, preexec_fn=_die_with_parent)  # fmt: skip
    errors: list[str] = []
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, index, "stdout", lines, None), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, index, "stderr", lines, errors), daemon=True),
    ]
    for t in pumps:
        t.start()
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # ray.cancel: the main process was interrupted; the worker records its trial
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    for t in pumps:
        t.join(timeout=10)
    shutil.rmtree(folder, ignore_errors=True)  # its configuration and Hydra's record: its lines were relayed
    return {"index": index, "code": code, "errors": errors, "node": node}


@dataclass
class RayWorker:
    plan: WorkerPlan
    errors: list[str] = field(default_factory=list)
    deaths: list[str] = field(default_factory=list)
    restarts: int = 0


class RayWorkers:
    """The worker tasks under way, their lines relayed, and a worker whose task died started again."""

    def __init__(self, ray: Any, submit: Any, plans: list[WorkerPlan], lines: Any, max_restarts: int) -> None:
        self.ray, self.submit, self.lines, self.max_restarts = ray, submit, lines, max_restarts
        self.workers = [RayWorker(p) for p in plans]
        self.pending = {submit(p.index): w for p, w in zip(plans, self.workers, strict=True)}
        self.codes: dict[int, int] = {}
        self._relaying = True
        self._relay = threading.Thread(target=self._relay_lines, daemon=True)
        self._relay.start()

    def _relay_lines(self) -> None:
        """Worker lines as the local launcher shows them: stdout as it is, stderr prefixed ``[worker i]``."""
        from ray.util.queue import Empty

        while self._relaying or not self.lines.empty():
            try:
                index, kind, line = self.lines.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # the queue's actor went away with the cluster: nothing more to relay
                return
            if kind == "stdout":
                sys.stdout.write(line)
                sys.stdout.flush()
            else:
                workers.relay_line(index, line, [])

    def wait(self, forward: str | None = None) -> list[int]:
        if forward:
            for ref in self.pending:
                self.ray.cancel(ref)
        deadline = time.monotonic() + STOP_WAIT_S if forward else None
        while self.pending:
            if deadline is not None and time.monotonic() > deadline:
                for ref in self.pending:
                    self.ray.cancel(ref, force=True)
                deadline = None
            ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=1.0)
            for ref in ready:
                self._ended(ref, restart=forward is None)
        self._relaying = False
        self._relay.join(timeout=10)
        return [self.codes[w.plan.index] for w in self.workers]

    def _ended(self, ref: Any, restart: bool) -> None:
        worker = self.pending.pop(ref)
        index = worker.plan.index
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.TaskCancelledError:
            self.codes[index] = 130
            return
        except self.ray.exceptions.RayTaskError as exc:  # the task's own code raised: not a lost node
            worker.errors.append(f"{type(exc.cause).__name__}: {exc.cause}"[:300])
            self.codes[index] = 1
            return
        except self.ray.exceptions.RayError as exc:  # its process or node died
            reason = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:200]  # Ray's first sentence
            worker.deaths.append(f"{type(exc).__name__}: {reason}")
            if restart and worker.restarts < self.max_restarts:
                worker.restarts += 1
                print(f"[worker {index}] died ({type(exc).__name__}); starting it again through Ray "
                      f"({worker.restarts}/{self.max_restarts})", file=sys.stderr, flush=True)  # fmt: skip
                self.pending[self.submit(index)] = worker
            else:
                self.codes[index] = -1
            return
        worker.errors.extend(result["errors"])
        self.codes[index] = int(result["code"])


class RayLauncher:
    """Worker loops as Ray tasks on a running cluster (``address``: ``auto``, ``HOST:PORT`` or
    ``ray://HOST:10001`` for Ray Client; null starts a Ray instance of this machine's own)."""

    def __init__(self, address: str | None = "auto", max_restarts: int = 2, num_cpus: float = 1,
                 num_gpus: float | str = "auto", spread: bool = True) -> None:  # fmt: skip
        if address is not None and not isinstance(address, str):
            raise NasError(f"search.launcher.address={address!r} must be auto, HOST:PORT, ray://HOST:PORT or null")
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise NasError(f"search.launcher.max_restarts={max_restarts!r} must be a whole number >= 0")
        if not (isinstance(num_cpus, int | float) and num_cpus > 0):
            raise NasError(f"search.launcher.num_cpus={num_cpus!r} must be > 0 (cores each worker holds)")
        if num_gpus != "auto" and not (isinstance(num_gpus, int | float) and num_gpus >= 0):
            raise NasError(f"search.launcher.num_gpus={num_gpus!r} must be auto or >= 0 (GPUs each worker holds)")
        self.address, self.max_restarts, self.num_cpus = address, max_restarts, float(num_cpus)
        self.num_gpus, self.spread = num_gpus, spread
        self._ray: Any = None
        self._gpus = 0.0

    def plan(self, cfg: DictConfig) -> list[WorkerPlan]:
        s = cfg.search
        if s.get("gpus") is not None:
            raise NasError("search.gpus picks GPUs of this machine; with search.launcher=ray Ray places the workers "
                           "on free GPUs of any node: leave search.gpus unset and set search.workers")  # fmt: skip
        count, per_gpu = int(s.workers), int(s.trials_per_gpu)
        if count < 1 or per_gpu < 1:
            raise NasError("search.workers and search.trials_per_gpu must be >= 1")
        return [WorkerPlan(i, None) for i in range(count)]

    def check(self, cfg: DictConfig, plans: list[WorkerPlan]) -> None:
        """Ray installed, the cluster reached, nothing measured where Ray places workers, and stores every node
        can reach."""
        if workers.measures_here(cfg.latency):
            raise NasError("with search.launcher=ray the workers run on whichever node Ray places them, so they "
                           "cannot measure latency where they train: use the lookup table "
                           "(latency.estimator=table, built once here) or measure on the target "
                           "(latency.target)")  # fmt: skip
        ray = self._connect()
        elsewhere = other_machines(ray.nodes(), self._driver_node(ray))
        stores = file_stores(cfg)
        if elsewhere and stores:
            raise NasError(f"{' and '.join(stores)} is a file on this machine, which Ray workers on other machines "
                           f"({', '.join(elsewhere)}) cannot reach: use PostgreSQL (study.storage=postgresql://...) "
                           "and an MLflow server (mlflow.tracking_uri=http://...), as the README's many-machines "
                           "section shows")  # fmt: skip
        per_gpu = int(cfg.search.trials_per_gpu)
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        self._gpus = (1.0 / per_gpu if has_gpus else 0.0) if self.num_gpus == "auto" else float(self.num_gpus)

    def _connect(self) -> Any:
        ray = self._ray = self._ray or _import_ray()
        if ray.is_initialized():
            return ray
        where = self.address or "a Ray instance of this machine's own"
        try:
            _answers(ray, self.address)
            ray.init(address=self.address, namespace="nas", log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError, OSError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise NasError(f"cannot reach the Ray cluster at {where}: {reason}. Start it (ray start --head, then "
                           "ray start --address=HEAD:6379 on the other nodes) or set "
                           "search.launcher.address") from None  # fmt: skip
        return ray

    @staticmethod
    def _driver_node(ray: Any) -> str | None:
        try:
            return ray.get_runtime_context().get_node_id()
        except Exception:  # Ray Client: this process is not on a node
            return None

    def describe(self, plans: list[WorkerPlan]) -> str:
        gpus = f", {self._gpus:g} GPU" if self._gpus else ""
        return (f"starting {len(plans)} workers through Ray at {self.address or 'this machine'} "
                f"({self.num_cpus:g} CPU{gpus} each{', spread over its nodes' if self.spread else ''})")  # fmt: skip

    def start(self, cfg: DictConfig, plans: list[WorkerPlan], folder: Path, extra: Sequence[str]) -> RayWorkers:
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ray = self._connect()
        text, secrets = workers.worker_config(cfg)
        credentials = {k: os.environ[k] for k in CREDENTIAL_ENV if k in os.environ}
        secrets_ref = ray.put({**workers.secret_env(secrets), **credentials})  # the object store, not the task spec
        # The lines' queue lives beside this process (an actor on this node): a lost worker node takes only its own
        # lines with it.
        here = self._driver_node(ray)
        placement = {"scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=True)} if here else {}
        lines = Queue(actor_options={"num_cpus": 0, **placement})
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self._gpus, "max_retries": 0}
        if self.spread:
            options["scheduling_strategy"] = "SPREAD"
        task = ray.remote(run_worker)

        def submit(index: int) -> Any:
            return task.options(name=f"nas-worker-{index}", **options).remote(
                index, text, list(extra), secrets_ref, lines, str(Path.cwd())
            )

        return RayWorkers(ray, submit, plans, lines, self.max_restarts)
