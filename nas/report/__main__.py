"""``python -m nas.report [study.name=...]``: regenerate a study's plots into outputs/reports/ and MLflow."""

from __future__ import annotations

from pathlib import Path

import hydra
import optuna
from omegaconf import DictConfig

from nas.cli import CONF_DIR, quiet_libraries, user_errors
from nas.errors import NasError


@user_errors
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    from nas.objectives import objective_of
    from nas.report import publish_plots
    from nas.retrain.select import latest_study
    from nas.search.study import make_storage
    from nas.tracking.runs import connect
    from nas.tracking.trials import StudyTracker
    from nas.urls import mask_url

    storage = make_storage(cfg)
    name = cfg.study.name or latest_study(storage)
    if name not in optuna.get_all_study_names(storage):
        known = optuna.get_all_study_names(storage)
        raise NasError(f"no study named {name!r} in {mask_url(str(cfg.study.storage))}; known: {known}")
    study = optuna.load_study(study_name=name, storage=storage)
    tracker = StudyTracker(connect(cfg.mlflow), cfg, name)
    tracker.join_parent(study)
    files = publish_plots(study, tracker, objective_of(study), keep_in=Path("outputs") / "reports" / name)
    print(
        f"{len(files)} files in outputs/reports/{name}/"
        + (" and the study's MLflow run" if tracker.parent_run_id else "")
    )
    for f in files:
        print(f"  {f}")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    app()
