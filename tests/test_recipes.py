"""The README's recipes for many machines without Ray (``examples/``): a SLURM array job and an indexed Kubernetes
Job, run as SLURM and Kubernetes would run them (their script, with the index each sets), here against one
study file: the worker started first waits for the main process, and together they train exactly the trials."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import FAST, HANG_S, ROOT, subprocess_env


def _slurm(index: int) -> tuple[list[str], dict[str, str]]:
    return ["bash", str(ROOT / "examples" / "slurm" / "search.sbatch")], {"SLURM_ARRAY_TASK_ID": str(index)}


def _kubernetes(index: int) -> tuple[list[str], dict[str, str]]:
    job = yaml.safe_load((ROOT / "examples" / "kubernetes" / "search-job.yaml").read_text())
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}  # a Secret's are the cluster's
    return [*container["command"], *container["args"]], env | {"JOB_COMPLETION_INDEX": str(index)}


def _wait_for_line(path: Path, text: str, proc: subprocess.Popen) -> None:
    deadline = time.time() + HANG_S
    while text not in path.read_text():
        assert proc.poll() is None and time.time() < deadline, path.read_text()
        time.sleep(0.2)


def _start(recipe, index: int, folder: Path, ours: dict[str, str]) -> subprocess.Popen:
    cmd, env = recipe(index)
    with (folder / f"task-{index}.log").open("w") as out:
        return subprocess.Popen(
            cmd, cwd=folder, env=subprocess_env() | env | ours, stdout=out, stderr=subprocess.STDOUT
        )


def test_each_recipe_runs_a_main_process_and_a_worker_that_waits_for_it(tmp_path, tiny_space):
    """Both recipes at once, each on a study of its own; in each the worker starts first and must wait for the
    main process rather than make a study of its own."""
    folders = {recipe: tmp_path / recipe.__name__.strip("_") for recipe in (_slurm, _kubernetes)}
    procs = {}
    for recipe, folder in folders.items():
        folder.mkdir()
        ours = {
            "NAS_STORAGE": f"sqlite:///{folder}/outputs/optuna.db",
            "NAS_SPACE": str(tiny_space),
            "NAS_TRACKING": f"sqlite:///{folder}/outputs/mlflow.db",
            "NAS_TRIALS": "3",
            "NAS_ARGS": " ".join([*FAST, "latency.calibrate=2", "search.enqueue_references=false"]),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }  # PATH: this python, venv active or not
        procs[recipe] = [_start(recipe, 1, folder, ours)]
        _wait_for_line(folder / "task-1.log", "waiting for the main process to prepare study tiny-digits",
                       procs[recipe][0])  # fmt: skip
        procs[recipe].append(_start(recipe, 0, folder, ours))
    for recipe, folder in folders.items():
        for proc, index in zip(procs[recipe], (1, 0), strict=True):
            assert proc.wait(timeout=HANG_S) == 0, (folder / f"task-{index}.log").read_text()
        study = optuna.load_study(study_name="tiny-digits", storage=f"sqlite:///{folder}/outputs/optuna.db")
        assert len([t for t in study.trials if t.user_attrs.get("state") == "complete"]) == 3
        client = MlflowClient(f"sqlite:///{folder}/outputs/mlflow.db")
        runs = client.search_runs([client.get_experiment_by_name("tiny-digits").experiment_id], max_results=100)
        parents = [r.info.run_id for r in runs if r.data.tags.get("nas.kind") == "study"]
        trial_runs = [r for r in runs if r.data.tags.get("nas.kind") == "trial"]
        assert len(parents) == 1 and len(trial_runs) == 3  # the worker made no study run of its own
        assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == set(parents)
        assert "worker 1: study tiny-digits (resumed, " in (folder / "task-1.log").read_text()  # joined as a worker
