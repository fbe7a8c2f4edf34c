"""Shared fixtures: tiny spaces and composed configs so CPU tests stay fast."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from nas.cli import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
CIFAR_JPG = ROOT.parent / "shared" / "data" / "cifar10-jpg"
# How long a test waits for a process (a command, a server, a line) before calling it hung: a guard against a
# hang, never a speed check; the suite must pass on a CI machine other jobs slow down several times over.
HANG_S = 900

# Small enough that one epoch of digits trains in a couple of seconds on 2 CPU cores.
TINY_SPACE = (ROOT / "tests" / "tiny_space.yaml").read_text()  # also the dry run of benchmarks/gpu_checks.py

TINY_ARCH = "nas1-r16-w0.5-stem_c16_s1_hs-k3_e2_c16_s2_re-k3_e3_c24_s2_hs_se-head_c64_hs-fc_c64"


# Few layers, so that a table in a runtime (an ONNX export per layer) builds in seconds; SE in one block only.
MICRO_SPACE = """\
description: micro test space
resolution: 16
width: [0.5]
stem: {channels: 16, stride: 1, activation: hswish}
block: {kernel: [3, 5], expansion: [2], se: [false], activation: [relu]}
stages:
  - {channels: 16, stride: 2, depth: [1]}
  - {channels: 24, stride: 2, depth: [1], se: [false, true]}
head: {channels: 64, activation: hswish}
classifier: {channels: 64}
"""


@pytest.fixture
def micro_space(tmp_path: Path) -> Path:
    path = tmp_path / "spaces" / "micro.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(MICRO_SPACE)
    return path


@pytest.fixture
def tiny_space(tmp_path: Path) -> Path:
    path = tmp_path / "spaces" / "tiny.yaml"
    path.parent.mkdir()
    path.write_text(TINY_SPACE)
    return path


def write_image_folder(root: Path, per_class: int = 12, size: int = 16, seed: int = 0) -> Path:
    """A tiny ImageFolder (two classes of random PNGs, train/ and test/), as a user's folder would be."""
    import torch
    from torchvision.transforms.functional import to_pil_image

    gen = torch.Generator().manual_seed(seed)
    for split, n in (("train", per_class), ("test", max(2, per_class // 4))):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                to_pil_image(torch.randint(0, 255, (3, size, size), dtype=torch.uint8, generator=gen)).save(
                    folder / f"{i}.png"
                )
    return root


def budget_at_percentile(space_file: Path, cfg: DictConfig, q: float) -> float:
    """A latency budget between the space's own fast and slow networks, from the lookup table the search
    will use (``cfg`` must say latency.estimator=table): about a fraction ``q`` of draws meet it."""
    import numpy as np

    from nas.latency.estimator import make_estimator
    from nas.space import load_space

    space = load_space(space_file)
    estimator = make_estimator(cfg.latency, 10, space, int(cfg.seed))
    return float(np.quantile([estimator.latency_ms(space.sample(seed)) for seed in range(200)], q))


def compose_cfg(*overrides: str, config_name: str = "config") -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


@pytest.fixture(autouse=True)
def _no_mlflow_store_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``mlflow.tracking_uri`` defaults to MLFLOW_TRACKING_URI, which MLflow's own ``set_tracking_uri`` writes:
    every test starts without it (a store from the shell or from another test is never written to), and what a
    test sets is undone after it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # recorded, so that the deletion is undone too
    monkeypatch.delenv("MLFLOW_TRACKING_URI")


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run with the working directory in a temp folder, so outputs/ lands there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("HYDRA_FULL_ERROR", None)
    return env


# A search small enough for CPU tests: digits, one short epoch, few latency repeats, no plots
# and no finalist round (5 s per search; test_search, test_finalists and test_retrain check them).
FAST = (
    "search.plots=false",
    "search.finalists=0",  # the finalist round has tests of its own
    "data=digits",
    "train.epochs=1",
    "data.repeat=1",
    "train.batch_size=64",
    "latency.device=cpu",
    "latency.repeats=5",
    "latency.warmup=2",
)


def mlflow_api(base: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


AUTH_PASSWORD = "Adm1n-s3cret-pw"  # the admin of test servers started with auth=True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen) -> None:
    """Until ``url`` answers; fails when the server exits first or after HANG_S."""
    deadline = time.time() + HANG_S
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return
        except OSError:
            assert server.poll() is None and time.time() < deadline, f"{url}: the server did not start"
            time.sleep(1)


@contextlib.contextmanager
def mlflow_server(cwd: Path, auth: bool = False) -> Iterator[tuple[subprocess.Popen, str]]:
    """``mlflow ui`` on the folder's outputs/mlflow.db, on a free loopback port; yields (process, base URL).

    ``auth=True``: MLflow's basic-auth app, admin user ``admin`` with password ``AUTH_PASSWORD``."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", "sqlite:///outputs/mlflow.db",
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    (cwd / "outputs").mkdir(exist_ok=True)
    env = subprocess_env()
    if auth:
        ini = cwd / "auth.ini"
        ini.write_text(
            f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{cwd}/basic_auth.db\n"
            f"admin_username = admin\nadmin_password = {AUTH_PASSWORD}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        cmd += ["--app-name", "basic-auth"]
        env |= {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "tests"}
    server = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{base}/health", server)
        yield server, base
    finally:
        server.terminate()
        server.wait(timeout=30)


@contextlib.contextmanager
def mlflow_ui(cwd: Path, experiment: str) -> Iterator[tuple[str, str]]:
    """``mlflow ui`` serving a finished search's database; yields (base URL, the experiment's id)."""
    with mlflow_server(cwd) as (_, base):
        exp = mlflow_api(base, f"experiments/get-by-name?experiment_name={experiment}")["experiment"]
        yield base, exp["experiment_id"]
