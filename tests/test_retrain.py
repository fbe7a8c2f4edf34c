"""Winners: selection rules, retraining, export, registry, nas.load, plots."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from omegaconf import open_dict
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
from nas.train.run import load_training_data, make_datamodule
from tests.conftest import (
    FAST,
    HANG_S,
    TINY_ARCH,
    compose_cfg,
    free_port,
    subprocess_env,
    wait_until_up,
    write_image_folder,
)

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


def _onnx_outputs(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_onnx_export_matches_pytorch(tmp_path):
    """Checked here in onnxruntime on its own, at a batch size export_onnx's check does not use."""
    model = build(decode(TINY_ARCH), 10).eval()
    export_onnx(model, 16, tmp_path / "m.onnx")
    x = torch.randn(9, 3, 16, 16)
    with torch.no_grad():
        np.testing.assert_allclose(_onnx_outputs(tmp_path / "m.onnx", x), model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_retrain_registers_a_model_that_loads_anywhere(in_tmp, tiny_space):
    run_search(compose_cfg(f"+space={tiny_space}", *FAST, "trials=2"))
    base = (f"+space={tiny_space}", *FAST, "train.epochs=1", "+select=best")
    retrain_keys = "+retrain={{train_on_val: true, register: {0}, model_name: null, alias: champion, export: {0}}}"
    cfg = compose_cfg(*base, "+run_id=null", retrain_keys.format("true"))
    result = retrain(cfg)
    assert result.model_name == "nas-tiny-digits" and result.model_version == "1"
    assert result.latency_ms > 0
    study = optuna.load_study(study_name="tiny-digits", storage="sqlite:///outputs/optuna.db")
    best = max((t for t in study.trials if "val_acc" in t.user_attrs), key=lambda t: t.user_attrs["val_acc"])
    assert result.selection.trial == best.number and result.selection.arch.encode() == best.user_attrs["arch"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{in_tmp}/outputs/mlflow.db")
    run = client.get_run(result.run_id)
    assert run.data.tags["nas.source.study"] == "tiny-digits"
    assert run.data.tags["nas.source.trial"] == str(best.number)
    assert {"test_acc", "latency_ms", "params", "flops", "train_loss"} <= set(run.data.metrics)
    assert "val_acc" not in run.data.metrics and run.data.params["train_on_val"] == "True"  # val is trained on
    exported = {a.path for a in client.list_artifacts(result.run_id, "export")}
    assert {"export/model.onnx", "export/model.pt2", "export/arch.txt"} <= exported
    bundle = Path(client.download_artifacts(result.run_id, "bundle", str(in_tmp / "dl")))
    assert sorted(f.name for f in bundle.iterdir()) == ["arch.txt", "preprocess.json", "weights.pt"]
    assert (bundle / "arch.txt").read_text().strip() == best.user_attrs["arch"]
    assert str(client.get_model_version_by_alias("nas-tiny-digits", "champion").version) == "1"

    # A fresh process loads the registered model through MLflow alone (its python_function carries the network
    # and the code that preprocesses images), and its network gives the same outputs, for any batch size.
    x = torch.randn(7, 3, 16, 16)
    np.save(in_tmp / "x.npy", x.numpy())
    code = (
        "import mlflow, numpy as np, torch\n"
        f"mlflow.set_tracking_uri('sqlite:///{in_tmp}/outputs/mlflow.db')\n"
        "m = mlflow.pyfunc.load_model('models:/nas-tiny-digits/latest').unwrap_python_model().classifier.model\n"
        "x = torch.from_numpy(np.load('x.npy'))\n"
        "with torch.no_grad():\n"
        "    np.save('y7.npy', m(x).numpy()); np.save('y1.npy', m(x[:1]).numpy())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=in_tmp, capture_output=True, text=True, env=subprocess_env(), timeout=HANG_S
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{in_tmp}/outputs/mlflow.db")
    local = nas.load("models:/nas-tiny-digits@champion")
    with torch.no_grad():
        expected = local.model(x).numpy()
    np.testing.assert_allclose(np.load(in_tmp / "y7.npy"), expected, atol=1e-5)
    np.testing.assert_allclose(np.load(in_tmp / "y1.npy"), expected[:1], atol=1e-5)

    # The exports compute what the registered model computes, at a batch size of their own.
    export = Path(client.download_artifacts(result.run_id, "export", str(in_tmp / "dl")))
    np.testing.assert_allclose(_onnx_outputs(export / "model.onnx", x), expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        pt2 = torch.export.load(str(export / "model.pt2")).module()(x).numpy()
    np.testing.assert_allclose(pt2, expected, rtol=1e-4, atol=1e-5)

    # Keras-like use on raw test images: nas.load's preprocessing is the training one, so its accuracy
    # on the test split is the test_acc the retrain reported.
    splits = load_training_data(cfg)
    images = [img[0].numpy() for img in splits.test_x]  # (8, 8) uint8 grey images
    truth = [splits.classes[i] for i in splits.test_y]
    labels = local.predict(images)
    assert np.mean([a == b for a, b in zip(labels, truth, strict=True)]) == pytest.approx(result.test_acc)
    # Files and PIL images give what arrays give; a saved bundle reloads to the same predictions.
    from PIL import Image

    for i, img in enumerate(images[:4]):
        Image.fromarray(img).save(in_tmp / f"img{i}.png")
    files = [in_tmp / f"img{i}.png" for i in range(4)]
    proba = local.predict_proba(images[:4])
    np.testing.assert_allclose(local.predict_proba(files), proba, atol=1e-6)
    np.testing.assert_allclose(local.predict_proba([Image.open(f) for f in files]), proba, atol=1e-6)
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
    other = next(t for t in study.trials if t.number != best.number)
    other_run = next(r for r in client.search_runs([run.info.experiment_id])
                     if r.data.tags.get("optuna.trial_number") == str(other.number))  # fmt: skip
    by_run_keys = (*base, f"+run_id={other_run.info.run_id}", retrain_keys.format("false"))
    with pytest.raises(NasError, match=r"different setup \(optimizer: 'torch.optim.SGD' -> 'torch.optim.AdamW'\)"):
        retrain(compose_cfg(*by_run_keys, "train/optimizer=adamw"))  # the run's study is checked too
    trimmed = compose_cfg(*by_run_keys)
    with open_dict(trimmed):  # today's search.hparams no longer lists label smoothing
        del trimmed.search.hparams["train.label_smoothing"]
    by_run = retrain(trimmed)
    assert by_run.selection.arch.encode() == other.user_attrs["arch"] and by_run.selection.trial == other.number
    logged = client.get_run(by_run.run_id).data.params
    for key in ("train.optimizer.lr", "train.optimizer.weight_decay", "train.label_smoothing"):
        assert logged[key] == str(other.params[key]), key  # every hyperparameter the trial was trained with
    assert by_run.model_version is None


def test_retrain_cli_from_a_pareto_study_validating_each_epoch(in_tmp, tiny_space):
    """The command line on a study: select=pareto:0 (the fastest point of the front, i.e. the fastest
    network trained) and retrain.train_on_val=false (validation each epoch, val kept out of training)."""
    searched = ("trials=3", "search.objective=pareto", "latency.batch_size=2")
    run_search(compose_cfg(f"+space={tiny_space}", *FAST, *searched))
    study = optuna.load_study(study_name="tiny-digits", storage="sqlite:///outputs/optuna.db")
    fastest = min((t for t in study.trials if t.user_attrs.get("state") == "complete"),
                  key=lambda t: t.user_attrs["latency_ms"])  # fmt: skip
    cmd = [sys.executable, "-m", "nas.retrain", "select=pareto:0", *FAST, "train.epochs=2",
           "retrain.train_on_val=false", "retrain.export=false"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=in_tmp, env=subprocess_env(), timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"retrained {fastest.user_attrs['arch']}" in proc.stdout
    assert "registered models:/nas-tiny-digits/1 (alias @champion)" in proc.stdout
    from mlflow.tracking import MlflowClient

    run_id = re.search(r"MLflow run (\w+)", proc.stdout)[1]
    client = MlflowClient(f"sqlite:///{in_tmp}/outputs/mlflow.db")
    assert client.get_run(run_id).data.tags["nas.source.trial"] == str(fastest.number)
    assert client.get_run(run_id).data.params["latency.batch_size"] == "2"  # the study's, not the command's 1
    assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [0, 1]


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
        timeout=HANG_S,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "registered models:/tiny-arch/1 (alias @champion)" in proc.stdout
    assert "test_acc" in proc.stdout and "Traceback" not in proc.stderr
    assert Path(tmp_path / "outputs" / "mlflow.db").is_file()
    # The printed line works verbatim in a new shell in that folder, and leaves no file behind (MLflow's
    # own fallback store would create ./mlflow.db and not find the model there).
    line = next(line for line in proc.stdout.splitlines() if line.startswith("  use it: "))
    command = line.removeprefix("  use it: ")
    assert command == "python -c \"import nas; m = nas.load('models:/tiny-arch@champion')\""
    before = sorted(tmp_path.rglob("*"))
    env = {k: v for k, v in subprocess_env().items() if k != "MLFLOW_TRACKING_URI"}
    loaded = subprocess.run(command.replace("python", sys.executable, 1) + " && echo loaded", shell=True,
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=HANG_S)  # fmt: skip
    assert loaded.returncode == 0 and "loaded" in loaded.stdout, loaded.stderr[-2000:]
    assert sorted(tmp_path.rglob("*")) == before
    # From another folder it says where it looked and what to pass, again without creating a store.
    load = [sys.executable, "-c", "import nas; nas.load('models:/tiny-arch@champion')"]
    elsewhere = subprocess.run(load, capture_output=True, text=True, cwd=tmp_path / "outputs", env=env, timeout=HANG_S)
    assert elsewhere.returncode != 0 and "pass tracking_uri=" in elsewhere.stderr
    assert sorted(tmp_path.rglob("*")) == before


def test_a_retrain_over_the_latency_budget_keeps_the_alias_where_it_was(in_tmp, capsys):
    from mlflow.tracking import MlflowClient

    from nas.retrain.__main__ import main

    common = (f"arch={TINY_ARCH}", *FAST, "retrain.export=false", "retrain.model_name=tiny")
    main(compose_cfg(*common, config_name="retrain_app"))  # version 1, no budget: @champion
    main(compose_cfg(*common, "latency.budget_ms=0.0001", config_name="retrain_app"))  # version 2, over it
    out = capsys.readouterr().out
    assert "(budget 0.0001 ms: OVER)" in out
    assert "registered models:/tiny/2, over the latency budget: alias @champion not moved" in out
    client = MlflowClient(f"sqlite:///{in_tmp}/outputs/mlflow.db")
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "1"
    main(compose_cfg(*common, "latency.budget_ms=0.0001", "retrain.allow_over_budget=true", config_name="retrain_app"))
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "3"


def test_a_retrain_judges_the_budget_only_on_the_device_the_study_measured(in_tmp, tiny_space, monkeypatch):
    """Issue 25, finding 6. A CPU study retrained on a GPU box (where latency.device=auto means CUDA) is
    measured on the CPU; a study whose budget is for a device this machine does not have is measured and
    logged, but the figure is not compared with it: the alias stays, and the run says why."""
    from mlflow.tracking import MlflowClient

    from nas.retrain.run import target_latency
    from nas.retrain.select import Selection

    run_search(compose_cfg(f"+space={tiny_space}", *FAST, "trials=1", "latency.budget_ms=1000"))
    study = optuna.load_study(study_name="tiny-digits", storage="sqlite:///outputs/optuna.db")
    identity = study.user_attrs["identity"]
    assert identity["latency.device"] == "cpu"
    on_gpu_box = compose_cfg(*FAST, "latency.device=auto", config_name="retrain_app")
    with monkeypatch.context() as gpu:
        gpu.setattr(torch.cuda, "is_available", lambda: True)
        gpu.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100")
        target = target_latency(on_gpu_box, Selection(decode(TINY_ARCH), study="tiny-digits", identity=identity))
    assert target.settings.device == "cpu" and target.unjudged is None and target.budget_ms == 1000

    study.set_user_attr("identity", {**identity, "latency_device": "Imaginary Edge CPU"})  # searched elsewhere
    r = retrain(compose_cfg(*FAST, "train.epochs=1", "retrain.export=false", config_name="retrain_app"))
    assert r.latency_ms > 0 and not r.over_budget and r.model_version == "1" and not r.alias_moved
    assert r.unjudged.startswith("study tiny-digits's budget of 1000 ms is for Imaginary Edge CPU, and this machine")
    client = MlflowClient(f"sqlite:///{in_tmp}/outputs/mlflow.db")
    assert client.get_run(r.run_id).data.tags["nas.budget"] == f"not judged: {r.unjudged}"
    assert client.get_registered_model("nas-tiny-digits").aliases == {}


def test_retrain_refuses_data_without_a_held_out_split_before_training(in_tmp):
    root = write_image_folder(in_tmp / "imgs", per_class=4)
    shutil.rmtree(root / "test")
    cfg = compose_cfg(f"arch={TINY_ARCH}", *FAST, "data=imagefolder", f"data.root={root}", config_name="retrain_app")
    with pytest.raises(NasError, match=r"has no held-out test split.*add ROOT/test/<class>/ \(or ImageNet's ROOT/val"):
        retrain(cfg)
    assert not (in_tmp / "outputs" / "mlflow.db").exists() or not _retrain_runs(in_tmp)


def test_a_retrain_whose_loss_diverges_registers_nothing(in_tmp):
    """Training on train+val validates nothing, so the check for a non-finite loss runs at each epoch's end."""
    cfg = compose_cfg(f"arch={TINY_ARCH}", *FAST, "train.optimizer.lr=1e30", "retrain.model_name=diverged",
                      config_name="retrain_app")  # fmt: skip
    assert cfg.retrain.train_on_val
    diverged = r"training loss became NaN or infinite in epoch 0 \(by step \d+\): nothing registered"
    with pytest.raises(NasError, match=diverged):
        retrain(cfg)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{in_tmp}/outputs/mlflow.db")
    assert client.search_registered_models() == []
    assert [r.info.status for r in _retrain_runs(in_tmp)] == ["FAILED"]


def _retrain_runs(folder: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder}/outputs/mlflow.db")
    return client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`nas.kind` = 'retrain'")


def test_retraining_needs_the_data_and_recipe_the_study_was_searched_with(in_tmp, tiny_space):
    """The study as the search stores it (not an identity written here), so a renamed key would show."""
    searched = ("data=digits", "train/optimizer=adamw", "train/schedule=onecycle")
    run_search(compose_cfg(f"+space={tiny_space}", *FAST, *searched, "trials=0"))
    study = optuna.load_study(study_name="tiny-digits", storage="sqlite:///outputs/optuna.db")
    with pytest.raises(NasError) as err:
        check_same_setup(study, compose_cfg())  # the defaults: CIFAR-10, SGD + cosine
    message = str(err.value)
    assert "(data: 'digits' -> 'cifar10'; optimizer: 'torch.optim.AdamW' -> 'torch.optim.SGD'" in message
    assert message.endswith("add data=digits train/optimizer=adamw train/schedule=onecycle")
    check_same_setup(study, compose_cfg(*searched))
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
    resized = compose_cfg("data=imagefolder", "data.root=/imgs", "data.image_size=256")
    assert "data.root=/imgs data.image_size=256 train/optimizer" in retrain_command(resized, "s")
    # The trials' batch size when it is not the data set's own (digits: 32, others 128).
    assert "train.batch_size" not in retrain_command(compose_cfg("data=digits"), "s")
    assert retrain_command(compose_cfg("data=digits", "train.batch_size=64"), "s").endswith(" train.batch_size=64")
    assert retrain_command(compose_cfg("train.batch_size=32"), "s").endswith(" train.batch_size=32")


def test_the_same_retrain_command_gives_the_same_weights_and_another_seed_other_ones(in_tmp):
    """Seeded from ``seed`` on CPU: rerunning the command reproduces the network bit for bit."""

    def weights(*extra: str) -> dict[str, torch.Tensor]:
        cfg = compose_cfg(f"arch={TINY_ARCH}", *FAST, "retrain.export=false", "retrain.register=false", *extra,
                          config_name="retrain_app")  # fmt: skip
        run_id = retrain(cfg).run_id
        return nas.load(
            f"runs:/{run_id}/bundle", tracking_uri=f"sqlite:///{in_tmp}/outputs/mlflow.db"
        ).model.state_dict()

    first, again, other = weights(), weights(), weights("seed=1")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_a_two_process_ddp_retrain_records_one_run_and_tests_every_image_once(tmp_path):
    """Lightning's DDP (gloo, 2 CPU processes) on a streamed folder: the second process is started by
    Lightning with the same command; only rank 0 creates, logs and registers."""
    from mlflow.tracking import MlflowClient

    root = write_image_folder(tmp_path / "imgs", per_class=30, size=16)
    (root / "test" / "dog" / "0.png").unlink()  # 13 test images: the ranks test 7 and 6
    folder = ("data=imagefolder", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "train.accelerator=cpu")
    cmd = [sys.executable, "-m", "nas.retrain", f"arch={TINY_ARCH}", *folder, "data.storage=stream", "data.workers=1",
           "train.devices=2", "train.epochs=2", "train.batch_size=8", "retrain.export=false",
           "retrain.model_name=ddp"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("retrained ") == 1 and "registered models:/ddp/1" in proc.stdout
    uri = f"sqlite:///{tmp_path}/outputs/mlflow.db"
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "tags.`nas.kind` = 'retrain'")
    assert len(runs) == 1  # not one per process
    run = runs[0]
    assert run.data.params["train.devices"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [0, 1]
    # The logged test accuracy is over all 13 images, each once: the same as one process finds.
    model = nas.load("models:/ddp/1", tracking_uri=uri).model
    cfg = compose_cfg(*folder, "data.storage=memory")
    dm = make_datamodule(cfg, load_training_data(cfg), 16, train_on_val=True)
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in dm.test_dataloader())
    assert len(dm.test_split.y) == 13
    assert run.data.metrics["test_acc"] == pytest.approx(correct / 13, abs=1e-6)


def test_mlflow_tracking_uri_in_the_environment_is_where_search_and_retrain_record(in_tmp, tiny_space, monkeypatch,
                                                                                  capsys):  # fmt: skip
    """Issue 32, item 9: MLflow's own MLFLOW_TRACKING_URI is the default store when set (what MLflow tells its
    users to export for a team server): the search and the retrain record there, nothing lands in
    outputs/mlflow.db, and the nas.load line the retrain prints works verbatim in a new shell."""
    from mlflow.tracking import MlflowClient

    from nas.retrain.__main__ import main

    team = in_tmp / "team" / "mlflow.db"
    team.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{team}")
    run_search(compose_cfg(f"+space={tiny_space}", *FAST, "trials=1"))
    out = capsys.readouterr().out
    assert f"MLflow sqlite:///{team}" in out.splitlines()[0]  # the start line names the store in use
    assert "mlflow.tracking_uri=" not in out  # the printed commands need nothing more in this environment
    main(compose_cfg(*FAST, "train.epochs=1", "retrain.export=false", config_name="retrain_app"))
    out = capsys.readouterr().out
    assert not (in_tmp / "outputs" / "mlflow.db").exists()
    client = MlflowClient(f"sqlite:///{team}")
    assert client.get_registered_model("nas-tiny-digits").aliases == {"champion": 1}
    line = next(s for s in out.splitlines() if s.startswith("  use it: ")).removeprefix("  use it: ")
    assert line == "python -c \"import nas; m = nas.load('models:/nas-tiny-digits@champion')\""
    code = line.removeprefix('python -c "').removesuffix('"') + "; print(m.classes)"
    elsewhere = in_tmp / "elsewhere"
    elsewhere.mkdir()
    env = subprocess_env() | {"MLFLOW_TRACKING_URI": f"sqlite:///{team}"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere, env=env,
                          timeout=HANG_S)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str([str(i) for i in range(10)])


def test_the_registered_model_serves_raw_images_through_mlflow(in_tmp, monkeypatch):
    """Issue 32, item 7: what an MLflow user tries first. mlflow.pyfunc.load_model(...).predict and a real
    ``mlflow models serve`` on 127.0.0.1 take image files (bytes; base64 in JSON) and answer the classes and
    probabilities nas.load gives: the preprocessing travels with the registered model."""
    import base64
    import io
    import json
    import urllib.request

    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from nas.data.sources import digits

    uri = f"sqlite:///{in_tmp}/outputs/mlflow.db"
    retrain(compose_cfg(f"arch={TINY_ARCH}", *FAST, "train.epochs=1", "retrain.export=false",
                        "retrain.model_name=served", config_name="retrain_app"))  # fmt: skip
    test = digits(str(in_tmp / "data"))
    arrays = [test.test_x[i, 0].numpy() for i in range(12)]  # 8x8 grey digits, as files
    files = []
    for a in arrays:
        buffer = io.BytesIO()
        Image.fromarray(a).save(buffer, format="PNG")
        files.append(buffer.getvalue())
    local = nas.load("models:/served@champion", tracking_uri=uri)
    run_id = MlflowClient(uri).get_model_version_by_alias("served", "champion").run_id
    bundle = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/bundle", tracking_uri=uri))
    pre = json.loads((bundle / "preprocess.json").read_text())
    assert pre["channels"] == 1 and pre["network_input"] == [3, 16, 16]  # the images' channels, the network's input
    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model("models:/served@champion").predict(pd.DataFrame({"image": files}))
    assert list(served["class"]) == local.predict(arrays)
    np.testing.assert_allclose(np.stack(served["probabilities"]), local.predict_proba(arrays), atol=1e-6)
    assert list(served["class_index"]) == [local.classes.index(c) for c in served["class"]]

    port = free_port()
    env = subprocess_env() | {"MLFLOW_TRACKING_URI": uri}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # its uvicorn, venv active or not
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/served@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              cwd=in_tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", server)
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(f).decode()] for f in files]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
        answer = json.load(urllib.request.urlopen(request, timeout=60))["predictions"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert [p["class"] for p in answer] == local.predict(files)
    np.testing.assert_allclose([p["probabilities"] for p in answer], local.predict_proba(files), atol=1e-6)
