"""Winners: selection rules, retraining, export, registry, nas.load, plots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution

import nas
from nas.errors import NasError
from nas.models import build
from nas.retrain.export import export_onnx
from nas.retrain.run import check_same_setup, retrain
from nas.retrain.select import from_run, from_study
from nas.search.console import retrain_command
from nas.search.runner import run_search
from nas.space import decode
from tests.conftest import FAST, TINY_ARCH, compose_cfg, subprocess_env

A = [TINY_ARCH.replace("w0.5", w) for w in ("w0.25", "w0.5", "w1", "w2")]


def _trial(acc, lat, arch, state="complete", values=None, lr=0.1, reference=None):
    attrs = {"state": state, "latency_ms": lat, "arch": arch, "params": 1000, "flops": 1000}
    if state == "complete":
        attrs["val_acc"] = acc
    if reference:
        attrs["reference"] = reference
    return optuna.trial.create_trial(
        values=values or [acc if state == "complete" else 0.0],
        params={"train.optimizer.lr": lr},
        distributions={"train.optimizer.lr": FloatDistribution(0.01, 0.4, log=True)},
        user_attrs=attrs,
        constraints={"latency_ms_over_budget": lat - 1.0},
    )


def _single() -> optuna.Study:
    study = optuna.create_study(direction="maximize", study_name="single")
    study.add_trial(_trial(0.8, 0.5, A[0], lr=0.05))
    study.add_trial(_trial(0.9, 0.9, A[1], lr=0.2, reference="mobilenet_v3_small"))
    study.add_trial(_trial(0.0, 1.5, A[2], state="infeasible"))
    return study


def _multi() -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"], study_name="multi")
    for acc, lat, arch in [(0.7, 0.3, A[0]), (0.85, 0.6, A[1]), (0.95, 1.4, A[2]), (0.6, 0.9, A[3])]:
        study.add_trial(_trial(acc, lat, arch, values=[acc, lat]))
    return study


def test_selection_rules():
    keys = ["train.optimizer.lr"]
    best = from_study(_single(), "best", None, keys)
    assert best.arch == decode(A[1]) and best.trial == 1 and best.hparams == {"train.optimizer.lr": 0.2}
    multi = _multi()
    # The 0.95 point broke the study's latency constraint: never selected. Most accurate feasible: 0.85.
    assert from_study(multi, "best", None, keys).arch == decode(A[1])
    within = from_study(multi, "best", 0.5, keys)  # most accurate Pareto point within a tighter budget
    assert within.arch == decode(A[0])
    assert from_study(multi, "pareto:0", None, keys).arch == decode(A[0])  # fastest Pareto point
    assert from_study(multi, "pareto:1", None, keys).arch == decode(A[1])
    with pytest.raises(NasError, match="has 2 points"):
        from_study(multi, "pareto:5", None, keys)
    with pytest.raises(NasError, match="needs a Pareto study"):
        from_study(_single(), "pareto:0", None, keys)


def test_onnx_export_matches_pytorch(tmp_path):
    model = build(decode(TINY_ARCH), 10).eval()
    err = export_onnx(model, 16, tmp_path / "m.onnx")
    assert err < 1e-4 and (tmp_path / "m.onnx").stat().st_size > 10_000


def test_retrain_registers_a_model_that_loads_anywhere(in_tmp, tiny_space):
    run_search(compose_cfg(f"+space={tiny_space}", *FAST, "trials=2"))
    cfg = compose_cfg(
        f"+space={tiny_space}",
        *FAST,
        "train.epochs=1",
        "+select=best",
        "+run_id=null",
        "+retrain={train_on_val: true, register: true, model_name: null, alias: champion, export: true}",
    )
    result = retrain(cfg)
    assert result.model_name == "nas-tiny-digits" and result.model_version == "1"
    assert 0 <= result.test_acc <= 1 and result.latency_ms > 0
    study = optuna.load_study(study_name="tiny-digits", storage="sqlite:///outputs/optuna.db")
    best = max((t for t in study.trials if "val_acc" in t.user_attrs), key=lambda t: t.user_attrs["val_acc"])
    assert result.selection.trial == best.number and result.selection.arch.encode() == best.user_attrs["arch"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{in_tmp}/outputs/mlflow.db")
    run = client.get_run(result.run_id)
    assert run.data.tags["nas.source.study"] == "tiny-digits"
    assert run.data.tags["nas.source.trial"] == str(best.number)
    assert {"test_acc", "latency_ms", "params", "flops", "train_loss"} <= set(run.data.metrics)
    assert run.data.metrics["onnx_max_abs_diff"] < 1e-4
    exported = {a.path for a in client.list_artifacts(result.run_id, "export")}
    assert {"export/model.onnx", "export/model.pt2", "export/arch.txt"} <= exported
    assert str(client.get_model_version_by_alias("nas-tiny-digits", "champion").version) == "1"

    # A fresh process loads the registered model and gives the same outputs, for any batch size.
    x = torch.randn(7, 3, 16, 16)
    np.save(in_tmp / "x.npy", x.numpy())
    code = (
        "import mlflow, numpy as np, torch\n"
        f"mlflow.set_tracking_uri('sqlite:///{in_tmp}/outputs/mlflow.db')\n"
        "m = mlflow.pytorch.load_model('models:/nas-tiny-digits/latest').eval()\n"
        "x = torch.from_numpy(np.load('x.npy'))\n"
        "with torch.no_grad():\n"
        "    np.save('y7.npy', m(x).numpy()); np.save('y1.npy', m(x[:1]).numpy())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=in_tmp, capture_output=True, text=True, env=subprocess_env(), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{in_tmp}/outputs/mlflow.db")
    local = nas.load("models:/nas-tiny-digits@champion")
    with torch.no_grad():
        expected = local.model(x).numpy()
    np.testing.assert_allclose(np.load(in_tmp / "y7.npy"), expected, atol=1e-5)
    np.testing.assert_allclose(np.load(in_tmp / "y1.npy"), expected[:1], atol=1e-5)

    # Keras-like use: predict on raw images with the training preprocessing, save and reload.
    images = [np.full((8, 8), 255 * (i % 2), dtype=np.uint8) for i in range(3)]
    labels = local.predict(images)
    assert len(labels) == 3 and set(labels) <= set(local.classes)
    assert local.predict_proba(images).shape == (3, 10)
    again = nas.load(local.save(in_tmp / "saved"))
    assert again.predict(images) == labels

    # The same trial found through its MLflow run.
    trial_run = next(
        r
        for r in client.search_runs([run.info.experiment_id])
        if r.data.tags.get("optuna.trial_number") == str(best.number)
    )
    sel = from_run(client, trial_run.info.run_id, ["train.optimizer.lr"])
    assert sel.arch == result.selection.arch and sel.trial == best.number
    assert sel.hparams["train.optimizer.lr"] == pytest.approx(best.params["train.optimizer.lr"])


def test_retrain_cli_with_explicit_arch(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nas.retrain",
            f"arch={TINY_ARCH}",
            *FAST,
            "train.epochs=1",
            "retrain.export=false",
            "retrain.model_name=tiny-arch",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=subprocess_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "registered models:/tiny-arch/1 (alias @champion)" in proc.stdout
    assert "test_acc" in proc.stdout and "Traceback" not in proc.stderr
    assert Path(tmp_path / "outputs" / "mlflow.db").is_file()


def test_retraining_needs_the_data_and_recipe_the_study_was_searched_with():
    study = _single()
    identity = {"data": "digits", "optimizer": "torch.optim.AdamW", "schedule": "nas.train.schedules.one_cycle"}
    study.set_user_attr("identity", identity)
    with pytest.raises(NasError) as err:
        check_same_setup(study, compose_cfg())  # the defaults: CIFAR-10, SGD + cosine
    message = str(err.value)
    assert "data digits (now cifar10), optimizer torch.optim.AdamW (now torch.optim.SGD)" in message
    assert message.endswith("add data=digits train/optimizer=adamw train/schedule=onecycle")
    check_same_setup(study, compose_cfg("data=digits", "train/optimizer=adamw", "train/schedule=onecycle"))
    check_same_setup(_single(), compose_cfg())  # a study stored without them is not held against


def test_retrain_command_carries_data_recipe_and_non_default_stores():
    cfg = compose_cfg(
        "data=imagefolder",
        "data.root=/data/cifar10-jpg",
        "train/optimizer=adamw",
        "study.storage=postgresql://nas:secret@db/nas",
        "mlflow.tracking_uri=http://mlflow:5000",
    )
    assert retrain_command(cfg, "s") == (
        "python -m nas.retrain study.name=s data=imagefolder data.root=/data/cifar10-jpg train/optimizer=adamw "
        "train/schedule=cosine study.storage=postgresql://nas:***@db/nas mlflow.tracking_uri=http://mlflow:5000"
    )
    assert retrain_command(compose_cfg(), "s") == (
        "python -m nas.retrain study.name=s data=cifar10 train/optimizer=sgd train/schedule=cosine"
    )
