"""Retrain a winner with the full recipe, test it once, measure it, export it and register it."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import lightning.pytorch as pl
import mlflow
import optuna
import torch
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from nas.data import TensorImageDataModule
from nas.data.loading import ImageData
from nas.errors import NasError
from nas.interrupts import Interrupted
from nas.latency.estimator import settings_from_cfg
from nas.latency.measure import MODES, LatencySettings, cpu_name, measure_arch, measure_file
from nas.latency.runtime import make_runtime
from nas.models import cost
from nas.onnx_export import export_onnx_file
from nas.retrain.export import Preprocess, export_onnx, export_program, write_bundle
from nas.retrain.select import Selection, from_run, from_study, get_trial_run
from nas.retrain.serving import log_serving_model
from nas.space import Arch, arch_from_text
from nas.studies import identity_diffs, load_search_study, make_storage, search_study_names
from nas.tracking.runs import connect, experiment_id
from nas.tracking.trials import EpochMetricsToMlflow
from nas.train.module import NonFiniteLossError
from nas.train.progress import EpochLines, human_duration, progress_bar
from nas.train.run import (
    apply_hparams,
    check_data_cfg,
    check_train_cfg,
    divergence_error,
    load_training_data,
    make_datamodule,
    make_module,
    make_trainer,
    process_rank,
    recipe,
    recipe_overrides,
)
from nas.urls import mask_url


@dataclass
class RetrainResult:
    run_id: str
    test_acc: float
    latency_ms: float
    model_name: str | None
    model_version: str | None
    selection: Selection
    budget_ms: float | None = None
    alias_moved: bool = False
    unjudged: str | None = None  # why the budget could not be judged on this machine (None: it was)
    latency_of: str = "torch"  # what was timed, in which runtime (the nas.latency_of tag)

    @property
    def over_budget(self) -> bool:
        return self.budget_ms is not None and self.unjudged is None and self.latency_ms > self.budget_ms


@dataclass(frozen=True)
class TargetLatency:
    """How the retrain measures its network and what it compares the figure with."""

    settings: LatencySettings
    budget_ms: float | None
    unjudged: str | None = None  # the budget's device is not this machine's: why the figure is not compared


def _device_kind(identity: dict) -> str | None:
    """cpu or cuda: what the study measured on (studies made before it was recorded: found by its name)."""
    kind = identity.get("latency.device")
    if kind:
        return str(kind)
    name = identity.get("latency_device")
    if name == cpu_name():
        return "cpu"
    if torch.cuda.is_available() and name == torch.cuda.get_device_name():
        return "cuda"
    return None


def target_latency(cfg: DictConfig, sel: Selection) -> TargetLatency:
    """Latency as the study judged it: on its kind of device (a CPU study retrained on a GPU box is measured on
    the CPU), at its batch size, mode and threads, against its budget. When this machine has no device of the
    study's name, the figure is still measured and logged, but not compared with the budget. Without a study,
    the command's own ``latency.*``."""
    ident = sel.identity
    stored_runtime = ident.get("latency.runtime_config")  # the study's runtime, whatever today's config says
    target = cfg.latency.get("target") or "local"  # today's address of the study's device, if it moved
    target = ident.get("latency.target") if target == "local" else target
    base = settings_from_cfg(cfg.latency, make_runtime(stored_runtime, target) if stored_runtime else None)
    if not ident:
        return TargetLatency(base, cfg.latency.budget_ms)
    kind = _device_kind(ident)
    device = kind if kind == "cpu" or (kind == "cuda" and torch.cuda.is_available()) else base.device
    settings = replace(
        base,
        device=device,
        batch_size=int(ident.get("latency_batch") or base.batch_size),
        mode=str(ident["latency.mode"]) if ident.get("latency.mode") in MODES else base.mode,  # another runtime: n/a
        threads=int(ident.get("latency.threads") or base.threads),
    )
    budget, wanted, here = ident.get("budget_ms"), ident.get("latency_device"), settings.device_name()
    unjudged = None
    if budget is not None and wanted and wanted != here:
        unjudged = (
            f"study {sel.study}'s budget of {budget:g} ms is for {wanted}, and this machine measures on {here}: the "
            "budget is not judged here"
        )
    return TargetLatency(settings, budget, unjudged)


def searched_hparam_keys(study: optuna.Study | None, cfg: DictConfig) -> list[str]:
    """The hyperparameters the study sampled, as it stored them: a retrain applies every one of them,
    whatever today's ``search.hparams`` says (older studies without the record: today's keys)."""
    stored = study.user_attrs.get("identity", {}).get("search.hparams") if study is not None else None
    return list(stored) if stored is not None else list(cfg.search.hparams)


def _study_of_run(cfg: DictConfig, name: str | None) -> optuna.Study | None:
    """The study a trial run came from, when it is in this storage (a run copied elsewhere may not be)."""
    if not name:
        return None
    storage = make_storage(cfg)
    return optuna.load_study(study_name=name, storage=storage) if name in search_study_names(storage) else None


def select(cfg: DictConfig, client: MlflowClient, image_size: int) -> tuple[Selection, str | None]:
    """The architecture to retrain and the space it came from (for the registered model's name)."""
    if cfg.arch:
        return Selection(arch=arch_from_text(cfg.arch, image_size)), None
    if cfg.run_id:
        run = get_trial_run(client, cfg.run_id)
        study = _study_of_run(cfg, run.data.tags.get("nas.study"))
        if study is not None:
            check_same_setup(study, cfg)
        sel = from_run(client, cfg.run_id, searched_hparam_keys(study, cfg))
        sel.identity = study.user_attrs.get("identity", {}) if study is not None else {}
        parent = run.data.tags.get("mlflow.parentRunId")
        space = client.get_run(parent).data.params.get("space") if parent else None
        return sel, space
    study = load_search_study(cfg, make_storage(cfg))
    check_same_setup(study, cfg)
    sel = from_study(study, str(cfg.select), cfg.latency.budget_ms, searched_hparam_keys(study, cfg))
    sel.identity = study.user_attrs.get("identity", {})
    return sel, study.user_attrs.get("identity", {}).get("space")


def check_same_setup(study: optuna.Study, cfg: DictConfig) -> None:
    """Retrain on the study's data set and with its recipe: a trial's sampled learning rate means
    something only with the optimizer and schedule it was searched with (an AdamW study's winner
    retrained by SGD at lr 0.003 would quietly underfit), and another data set is another problem."""
    stored = study.user_attrs.get("identity", {})
    diffs = identity_diffs(stored, {"data": cfg.data.name, **recipe(cfg)})
    if diffs:
        fix = " ".join(p for p in (f"data={stored.get('data', cfg.data.name)}", recipe_overrides(stored)) if p)
        raise NasError(
            f"study {study.study_name!r} was searched with a different setup ({'; '.join(diffs)}); retrain with "
            f"the same setup: add {fix}"
        )


def _preprocess(cfg: DictConfig, dm: TensorImageDataModule, resolution: int, channels: int) -> Preprocess:
    """What ``nas.load`` must do to an image to give the network the pixels training gave it."""
    stored = cfg.data.get("loader", {}).get("image_size")  # a folder decoded at data.image_size
    return Preprocess(
        resolution=resolution,
        mean=dm.mean.flatten().tolist(),
        std=dm.std.flatten().tolist(),
        channels=channels,
        classes=list(dm.classes),
        image_size=None if stored is None else int(stored),
        network_input=[3, resolution, resolution],
    )


def _require_test_split(cfg: DictConfig, splits: ImageData) -> None:
    if not splits.has_test:
        raise NasError(
            f"data set {cfg.data.name} at {cfg.data.get('root')} has no held-out test split, and a retrain "
            "reports accuracy on images it never trained on: add ROOT/test/<class>/ (or ImageNet's ROOT/val/<class>/) "
            "beside ROOT/train/<class>/"
        )


def _create_run(cfg: DictConfig, client: MlflowClient, sel: Selection) -> str:
    """The retrain's MLflow run, tagged with where its architecture came from."""
    exp = experiment_id(client, cfg.mlflow.experiment or sel.study or "retrain", cfg.mlflow.get("artifact_location"))
    source = {"nas.source.study": sel.study, "nas.source.trial": sel.trial, "nas.source.run_id": sel.run_id}
    tags = {"nas.kind": "retrain", "nas.source.how": sel.how} | {k: str(v) for k, v in source.items() if v is not None}
    name = f"retrain-{sel.study or 'arch'}-{sel.trial if sel.trial is not None else 0}"
    return client.create_run(exp, run_name=name, tags=tags).info.run_id


def _fit(
    run_cfg: DictConfig, arch: Arch, dm: TensorImageDataModule, metrics: EpochMetricsToMlflow | None, train_on_val: bool
) -> tuple[torch.nn.Module, float]:
    """Train, then test once; a diverged network stops here, before anything is published. Seeded first, so
    the same command gives the same weights (on the same machine and device). Under DDP every rank runs
    this; only rank 0 has ``metrics`` (the MLflow run)."""
    pl.seed_everything(int(run_cfg.seed), workers=False, verbose=False)
    module = make_module(run_cfg, arch, dm.num_classes)
    overrides = {"limit_val_batches": 0} if train_on_val else {}
    callbacks: list[pl.Callback] = [] if metrics is None else [metrics]
    if not progress_bar(run_cfg.train.progress_bar):
        callbacks.append(EpochLines("  "))  # on every rank (it reads the synced metrics), printed by rank 0
    trainer = make_trainer(run_cfg, callbacks, **overrides)
    try:
        trainer.fit(module, datamodule=dm)
    except NonFiniteLossError as exc:
        raise divergence_error(exc, run_cfg, ": nothing registered") from None
    test_acc = float(trainer.test(module, datamodule=dm, verbose=False)[0]["test_acc"])
    return module.model.cpu().eval(), test_acc


def _announce(cfg: DictConfig, sel: Selection, arch: Arch, dm: TensorImageDataModule, run_id: str) -> None:
    """What is about to train, on what, for how long, recorded where: before minutes to hours of training."""
    c, epochs = cost(arch, dm.num_classes), int(cfg.train.epochs)
    length = f"{epochs} epoch{'s' * (epochs != 1)} of batch {int(cfg.train.batch_size)}"
    train, test = len(dm.train_split.y), len(dm.test_split.y) if dm.test_split is not None else 0
    what = "train+val" if dm.train_on_val else "train"
    print(f"retraining {sel.describe()}: {arch.encode()}", flush=True)
    print(f"  {c.params / 1e6:.2f} M params, {c.mflops:.1f} MFLOPs at {arch.resolution}px; data {cfg.data.name}: "
          f"{train} {what} / {test} test images; {length}; MLflow "
          f"{mask_url(str(cfg.mlflow.tracking_uri))} run {run_id}", flush=True)  # fmt: skip
    if sel.epoch_seconds:
        searched = train - (len(dm.val_split.y) if dm.train_on_val else 0)  # what the trial's epochs went over
        per_epoch = sel.epoch_seconds * train / max(searched, 1)
        print(f"  about {human_duration(per_epoch * epochs)} at the search trial's pace ({per_epoch:.1f} s per "
              f"epoch); train.epochs=N for a shorter run", flush=True)  # fmt: skip


def retrain(cfg: DictConfig) -> RetrainResult | None:
    """The whole retrain on rank 0; under DDP the other ranks only train and test with it (None)."""
    check_train_cfg(cfg)
    check_data_cfg(cfg.data)
    client = connect(cfg.mlflow)
    devices = int(cfg.train.get("devices", 1))
    splits = load_training_data(cfg, processes=devices, per_device=1)
    _require_test_split(cfg, splits)
    sel, space = select(cfg, client, splits.image_shape[-1])
    run_cfg = apply_hparams(cfg, sel.hparams)
    arch, train_on_val = sel.arch, bool(cfg.retrain.train_on_val)
    dm = make_datamodule(run_cfg, splits, arch.resolution, train_on_val=train_on_val)
    if process_rank(cfg) != 0:
        _fit(run_cfg, arch, dm, None, train_on_val)
        return None
    run_id = _create_run(cfg, client, sel)
    _announce(run_cfg, sel, arch, dm, run_id)
    try:
        with mlflow.start_run(run_id=run_id):
            params = {"arch": arch.encode(), "train.epochs": run_cfg.train.epochs, "train_on_val": train_on_val}
            mlflow.log_params(params | sel.hparams | {"train.devices": devices * int(cfg.train.get("num_nodes", 1))})
            model, test_acc = _fit(run_cfg, arch, dm, EpochMetricsToMlflow(client, run_id), train_on_val)
            with tempfile.TemporaryDirectory() as tmp:
                exports = _export(model, arch, Path(tmp) / "export") if cfg.retrain.export else None
                target = target_latency(cfg, sel)
                latency, timed = _measure(target.settings, model, arch, dm.num_classes, exports)
                c = cost(arch, dm.num_classes)
                mlflow.log_metrics({"test_acc": test_acc, "latency_ms": latency, "params": c.params, "flops": c.flops})
                result = RetrainResult(
                    run_id, test_acc, latency, None, None, sel, target.budget_ms, False, target.unjudged, timed
                )
                if target.budget_ms is not None:
                    mlflow.log_metric("budget_ms", target.budget_ms)
                    mlflow.set_tag("nas.budget", _budget_verdict(result))
                name = cfg.retrain.model_name or f"nas-{space or 'arch'}-{cfg.data.name}"
                pre = _preprocess(cfg, dm, arch.resolution, splits.image_shape[0])
                judged_within = target.unjudged is None and not result.over_budget
                move_alias = judged_within or bool(cfg.retrain.allow_over_budget)
                result.model_version = _publish(cfg, client, run_id, model, arch, pre, name, move_alias, exports)
                result.model_name = name if result.model_version else None
                result.alias_moved = bool(result.model_version) and move_alias
        client.set_terminated(run_id, "FINISHED")
    except Interrupted:
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return result


def _export(model: torch.nn.Module, arch: Arch, exports: Path) -> Path:
    """The files users deploy: ONNX (checked against PyTorch in ONNX Runtime) and torch.export."""
    exports.mkdir(parents=True)
    mlflow.log_metric("onnx_max_abs_diff", export_onnx(model, arch.resolution, exports / "model.onnx"))
    export_program(model, arch.resolution, exports / "model.pt2")
    (exports / "arch.txt").write_text(arch.encode() + "\n")
    return exports


def _measure(
    settings: LatencySettings, model: torch.nn.Module, arch: Arch, num_classes: int, exports: Path | None
) -> tuple[float, str]:
    """The retrained network's latency as the study judged its trials. In a runtime that executes ONNX files it
    is the registered ``export/model.onnx`` that is timed (exported for this when ``retrain.export=false``):
    the figure reported is the file's that ships."""
    mlflow.log_params({f"latency.{k}": v for k, v in settings.key_fields().items()})
    if settings.is_torch:
        timed = f"{settings.runtime.label()} (the PyTorch network)"
        mlflow.set_tag("nas.latency_of", timed)
        return measure_arch(arch, num_classes, settings).median_ms, timed
    shape = (settings.batch_size, 3, arch.resolution, arch.resolution)
    with tempfile.TemporaryDirectory() as tmp:
        path = exports / "model.onnx" if exports else export_onnx_file(model, shape, Path(tmp) / "model.onnx")
        timed = f"{settings.runtime.label()} ({'export/model.onnx' if exports else 'the network exported to ONNX'})"
        mlflow.set_tag("nas.latency_of", timed)
        return measure_file(path, shape, settings).median_ms, timed


def _budget_verdict(result: RetrainResult) -> str:
    """The run's ``nas.budget`` tag: within, over, or why it was not judged."""
    if result.unjudged:
        return f"not judged: {result.unjudged}"
    return "over" if result.over_budget else "within"


def _publish(
    cfg: DictConfig,
    client: MlflowClient,
    run_id: str,
    model: torch.nn.Module,
    arch,
    pre: Preprocess,
    name: str,
    move_alias: bool,
    exports: Path | None,
) -> str | None:
    """Bundle + exports as artifacts; the model logged as MLflow's python_function of raw images (its
    preprocessing included: what ``mlflow models serve`` runs), registered, and given the alias unless it
    missed the latency budget."""
    with tempfile.TemporaryDirectory() as tmp:
        bundle = write_bundle(Path(tmp) / "bundle", model, arch, pre)
        mlflow.log_artifacts(str(bundle), "bundle")
        if exports is not None:
            mlflow.log_artifacts(str(exports), "export")
        info = log_serving_model(bundle, arch.resolution, pre.channels, name if cfg.retrain.register else None)
    if not cfg.retrain.register:
        return None
    version = str(info.registered_model_version)
    if move_alias:
        client.set_registered_model_alias(name, str(cfg.retrain.alias), version)
    client.set_model_version_tag(name, version, "arch", arch.encode())
    return version
