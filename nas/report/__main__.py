"""``python -m nas.report [study.name=...]``: regenerate a study's plots into outputs/reports/ and MLflow."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from nas.cli import CONF_DIR, launch, quiet_libraries, user_errors


@user_errors
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    from nas.objectives import objective_of
    from nas.report import publish_plots
    from nas.studies import load_search_study, make_storage
    from nas.tracking.runs import connect
    from nas.tracking.trials import StudyTracker

    study = load_search_study(cfg, make_storage(cfg))
    name = study.study_name
    tracker = StudyTracker(connect(cfg.mlflow), cfg, name)
    tracker.join_parent(study)
    files = publish_plots(study, tracker, objective_of(study), keep_in=Path("outputs") / "reports" / name)
    identity = study.user_attrs.get("identity", {})
    where = f"in {identity.get('latency.runtime') or 'torch'} on {identity.get('latency_device')}"
    print(
        f"{len(files)} files in outputs/reports/{name}/ (latency {where})"
        + (" and the study's MLflow run" if tracker.parent_run_id else "")
    )
    for f in files:
        print(f"  {f}")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    launch(app, "config")
