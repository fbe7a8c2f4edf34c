"""Study reports: plots regenerated for any study and attached to its MLflow parent run."""

from __future__ import annotations

import tempfile
from pathlib import Path

import optuna

from nas.objectives import StudyObjective
from nas.tracking.plots import study_plots
from nas.tracking.trials import StudyTracker


def publish_plots(
    study: optuna.Study, tracker: StudyTracker, goal: StudyObjective, keep_in: Path | None = None
) -> list[Path]:
    """Write the plots (to ``keep_in`` or a temporary folder) and log them under ``plots/`` of the study run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = keep_in or Path(tmp)
        files = study_plots(study, out, goal)
        for f in files:
            tracker.log_parent_file(f, "plots")
        return files if keep_in else []
