"""Study plots from ``optuna.visualization``: Pareto front, optimisation history, importances.

Each plot is written as interactive HTML (plotly) and PNG (Optuna's
matplotlib variant). For a single-objective study the accuracy/latency front
is drawn by giving Optuna's own Pareto plot a two-objective view of the
trials, with the latency constraint kept, so infeasible trials appear
distinguished exactly as Optuna draws them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optuna
from optuna.trial import FrozenTrial, TrialState

TARGET_NAMES = ["val_acc", "latency_ms"]


def _accuracy(t: FrozenTrial) -> float:
    return float(t.user_attrs.get("val_acc", 0.0))


def accuracy_latency_view(study: optuna.Study) -> optuna.Study:
    """An in-memory (maximise val_acc, minimise latency) copy of the finished trials, constraints included."""
    view = optuna.create_study(directions=["maximize", "minimize"], study_name=f"{study.study_name}-front")
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "latency_ms" not in t.user_attrs:
            continue
        view.add_trial(
            optuna.trial.create_trial(
                values=[_accuracy(t), float(t.user_attrs["latency_ms"])],
                params=t.params,
                distributions=t.distributions,
                user_attrs=t.user_attrs,
                constraints=t.constraints or None,
            )
        )
    return view


def _save(fig_plotly: object, fig_mpl: object, out: Path, name: str) -> list[Path]:
    html, png = out / f"{name}.html", out / f"{name}.png"
    fig_plotly.write_html(str(html), include_plotlyjs="cdn")  # type: ignore[attr-defined]
    figure = fig_mpl.figure if hasattr(fig_mpl, "figure") else fig_mpl  # Axes or ndarray of Axes
    if not hasattr(figure, "savefig"):
        figure = plt.gcf()
    figure.set_size_inches(9, 6)
    figure.savefig(png, dpi=110, bbox_inches="tight")
    plt.close("all")
    return [html, png]


def _mark_references(view: optuna.Study, fig_plotly: object, ax: object) -> None:
    refs = [t for t in view.trials if t.user_attrs.get("reference")]
    if not refs:
        return
    xs = [t.values[0] for t in refs]
    ys = [t.values[1] for t in refs]
    names = [t.user_attrs["reference"] for t in refs]
    fig_plotly.add_scatter(  # type: ignore[attr-defined]
        x=xs,
        y=ys,
        mode="markers+text",
        text=names,
        textposition="top center",
        name="references",
        marker={"symbol": "star", "size": 16, "color": "black"},
    )
    ax.scatter(xs, ys, marker="*", s=220, c="black", label="references", zorder=5)  # type: ignore[attr-defined]
    for x, y, n in zip(xs, ys, names, strict=True):
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(6, 6))  # type: ignore[attr-defined]
    ax.legend()  # type: ignore[attr-defined]


def study_plots(study: optuna.Study, out: Path) -> list[Path]:
    """Write the study's plots to ``out``; returns the files (a plot that needs more trials is skipped)."""
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_mpl

    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    view = accuracy_latency_view(study)
    if not view.trials:
        return files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the matplotlib variants are "experimental"
        fig = vis.plot_pareto_front(view, target_names=TARGET_NAMES, include_dominated_trials=True)
        ax = vis_mpl.plot_pareto_front(view, target_names=TARGET_NAMES, include_dominated_trials=True)
        _mark_references(view, fig, ax)
        files += _save(fig, ax, out, "pareto_front")
        multi = len(study.directions) > 1
        target = (lambda t: t.values[0]) if multi else None
        name = "val_acc" if multi else "objective"
        files += _save(
            vis.plot_optimization_history(study, target=target, target_name=name),
            vis_mpl.plot_optimization_history(study, target=target, target_name=name),
            out,
            "optimization_history",
        )
        try:
            files += _save(
                vis.plot_param_importances(study, target=target, target_name=name),
                vis_mpl.plot_param_importances(study, target=target, target_name=name),
                out,
                "param_importances",
            )
        except (ValueError, RuntimeError):  # fewer than two finished trials, or no common parameter
            plt.close("all")
    return files
