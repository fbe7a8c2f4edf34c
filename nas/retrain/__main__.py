"""``python -m nas.retrain [study.name=...|run_id=...|arch=...]``: retrain, test, export, register."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from nas.cli import CONF_DIR, default_tracking_uri, launch, quiet_libraries, user_errors
from nas.interrupts import Interrupted, signals_interrupt


@user_errors
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    from nas.retrain.run import retrain

    try:
        with signals_interrupt():
            r = retrain(cfg)
    except Interrupted as exc:
        print(
            f"\ninterrupted by {exc.signame}: the retrain stopped before it finished; its MLflow run is marked KILLED "
            f"and the @{cfg.retrain.alias} alias was not moved. Rerun the same command to retrain from the start",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(exc.exit_code)
    if r is None:  # a DDP rank other than 0: rank 0 reports
        return
    print(f"retrained {r.selection.arch.encode()}")
    sel = r.selection
    won = " (finalist round winner)" if sel.how == "finalist" else ""
    source = f"study {sel.study}, trial {sel.trial}{won}" if sel.study else sel.how
    if sel.note:
        print(f"  note: {sel.note}")
    budget = "" if r.budget_ms is None else f" (budget {r.budget_ms:g} ms{': OVER' if r.over_budget else ''})"
    if r.unjudged:
        budget = f" (budget {r.budget_ms:g} ms: not judged)"
    latency = f"latency {r.latency_ms:.4f} ms in {r.latency_of}{budget}"
    print(f"  source: {source}; test_acc {r.test_acc:.4f}; {latency}; MLflow run {r.run_id}")
    if r.model_name and r.alias_moved:
        print(f"  registered models:/{r.model_name}/{r.model_version} (alias @{cfg.retrain.alias})")
        print(f"  use it: {load_command(f'models:/{r.model_name}@{cfg.retrain.alias}', str(cfg.mlflow.tracking_uri))}")
    elif r.model_name:
        why, fix = (
            (r.unjudged, "retrain on that device, or retrain.allow_over_budget=true moves it")
            if r.unjudged
            else ("over the latency budget", "retrain.allow_over_budget=true moves it")
        )
        alias = f"@{cfg.retrain.alias}"
        print(f"  registered models:/{r.model_name}/{r.model_version}, {why}: alias {alias} not moved ({fix})")


def load_command(model_uri: str, tracking_uri: str) -> str:
    """The line that loads the model in a new shell: from the project folder the default store needs no
    argument; any other store is named (its password masked: give it in MLFLOW_TRACKING_PASSWORD)."""
    from nas.urls import mask_url

    where = "" if tracking_uri == default_tracking_uri() else f", tracking_uri='{mask_url(tracking_uri)}'"
    return f"python -c \"import nas; m = nas.load('{model_uri}'{where})\""


@hydra.main(config_path=CONF_DIR, config_name="retrain_app", version_base="1.3")
def app(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    launch(app, "retrain_app")
