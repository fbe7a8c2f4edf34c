"""Study charts, each as PNG (matplotlib) and interactive HTML (plotly).

- ``accuracy_vs_latency``: latency on x, validation accuracy on y, as the MobileNetV3 and MnasNet
  papers draw it. Trained networks at their accuracy, pruned ones at the accuracy of the epoch
  they were stopped (own marker), the budget as a vertical line, draws over it as ticks along the
  x axis (never as accuracy 0: they were not trained), references labelled, the feasible front as
  a step line. Optuna's Pareto plot cannot draw untrained trials apart or a budget line.
- ``param_importances``: Optuna's fANOVA importances over trained networks only (untrained draws
  would mostly explain what makes a network slow), the dozen most important choices named and
  the rest summed per stage, so 60 per-block names do not overlap.
- ``optimization_history``: Optuna's own plot over the trained networks' objective values.

Both renderers draw from one :class:`ChartData`, so the PNG and the HTML show the same thing.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optuna
import plotly.graph_objects as go
from optuna.trial import FrozenTrial

from nas import trial_states
from nas.objectives import ParetoObjective, StudyObjective

NAMED_IMPORTANCES = 12  # the rest is grouped per stage
# fANOVA fits a random forest of the objective on every choice (about 60 in a space of 15 blocks): over fewer
# trained networks than this it ranks noise, so the chart is not drawn and a line says why.
MIN_IMPORTANCE_NETWORKS = 20
SIZE_IN, DPI = (10.0, 6.0), 100  # 1000 x 600 px


@dataclass
class Point:
    latency_ms: float
    val_acc: float | None
    number: int
    label: str = ""  # a reference's name


@dataclass
class ChartData:
    complete: list[Point] = field(default_factory=list)
    pruned: list[Point] = field(default_factory=list)
    over_budget: list[Point] = field(default_factory=list)  # trials over it, and a sample of the refused draws
    over_budget_draws: int = 0  # every draw over the budget, refused or kept
    front: list[Point] = field(default_factory=list)
    budget_ms: float | None = None
    budget_label: str = "budget"
    x_label: str = "latency (ms)"


def _point(t: FrozenTrial) -> Point:
    acc = t.user_attrs.get("val_acc")
    return Point(float(t.user_attrs["latency_ms"]), None if acc is None else float(acc), t.number,
                 str(t.user_attrs.get("reference") or ""))  # fmt: skip


def front_of(points: list[Point]) -> list[Point]:
    """Points no other point beats in both accuracy and latency, fastest first (a step line)."""
    front: list[Point] = []
    for p in sorted(points, key=lambda p: (p.latency_ms, -(p.val_acc or 0.0))):
        if not front or (p.val_acc or 0.0) > (front[-1].val_acc or 0.0):
            front.append(p)
    return front


def chart_data(study: optuna.Study, goal: StudyObjective) -> ChartData:
    identity = study.user_attrs.get("identity", {})
    device, batch = identity.get("latency_device"), identity.get("latency_batch")
    runtime = f", {identity['latency.runtime']}" if identity.get("latency.runtime") else ""
    data = ChartData(
        budget_ms=goal.budget_ms,
        budget_label="budget" if goal.hard_budget else "target",
        x_label="latency (ms" + (f", batch {batch}{runtime} on {device}" if device else "") + ")",
    )
    for t in trial_states.trained(study):
        if "latency_ms" not in t.user_attrs:
            continue
        point = _point(t)
        if trial_states.state(t) == trial_states.COMPLETE:
            data.complete.append(point)
        elif point.val_acc is not None:
            data.pruned.append(point)
    data.over_budget = [_point(t) for t in trial_states.over_budget(study)]
    for number, r in trial_states.refusals(study):  # refused draws were never trials: the fastest and a random one
        data.over_budget.append(Point(float(r["fastest_ms"]), None, number))
        if r["sample_arch"] != r["fastest_arch"]:
            data.over_budget.append(Point(float(r["sample_ms"]), None, number))
    data.over_budget_draws = trial_states.counts(study)[trial_states.OVER_BUDGET]
    feasible = [p for p in data.complete if not goal.is_over_budget(p.latency_ms)]
    data.front = front_of(feasible)
    return data


def _over_budget_label(data: ChartData) -> str:
    shown, drawn = len(data.over_budget), max(data.over_budget_draws, len(data.over_budget))
    return f"over budget, not trained ({drawn}" + (f"; {shown} shown)" if shown < drawn else ")")


def _labelled(data: ChartData) -> list[Point]:
    return [p for p in (*data.complete, *data.pruned, *data.over_budget) if p.label]


def accuracy_latency_png(data: ChartData, path: Path) -> None:
    with plt.style.context("default"):  # Optuna's matplotlib plots switch the global style to ggplot
        _draw_accuracy_latency(data, path)


def _draw_accuracy_latency(data: ChartData, path: Path) -> None:
    fig, ax = plt.subplots(figsize=SIZE_IN)
    if data.front:
        xs = [p.latency_ms for p in data.front]
        ys = [p.val_acc for p in data.front]
        ax.step(xs, ys, where="post", color="tab:green", lw=1.5, label="feasible front", zorder=2)
    if data.complete:
        ax.scatter([p.latency_ms for p in data.complete], [p.val_acc for p in data.complete], s=36,
                   color="tab:blue", label=f"trained ({len(data.complete)})", zorder=3)  # fmt: skip
    if data.pruned:
        ax.scatter([p.latency_ms for p in data.pruned], [p.val_acc for p in data.pruned], s=40, marker="v",
                   facecolors="none", edgecolors="tab:gray", label=f"pruned, at its last epoch ({len(data.pruned)})",
                   zorder=3)  # fmt: skip
    if data.over_budget:  # ticks along the bottom edge: their accuracy is unknown, not zero
        ax.scatter([p.latency_ms for p in data.over_budget], [0.015] * len(data.over_budget), marker="|", s=160,
                   color="tab:red", transform=ax.get_xaxis_transform(), clip_on=False,
                   label=_over_budget_label(data), zorder=3)  # fmt: skip
    if data.budget_ms is not None:
        ax.axvline(data.budget_ms, color="tab:red", ls="--", lw=1.2, label=f"{data.budget_label} {data.budget_ms} ms")
    for p in _labelled(data):
        trained = p.val_acc is not None
        y, transform = (p.val_acc, ax.transData) if trained else (0.05, ax.get_xaxis_transform())
        ax.scatter([p.latency_ms], [y], marker="*", s=260, color="black", transform=transform, zorder=4)
        ax.annotate(p.label, (p.latency_ms, y), xycoords=transform, textcoords="offset points", xytext=(8, 6),
                    fontsize=10)  # fmt: skip
    xs = [p.latency_ms for p in (*data.complete, *data.pruned, *data.over_budget)]
    if data.budget_ms is not None:
        xs.append(data.budget_ms)
    pad = 0.04 * ((max(xs) - min(xs)) or max(xs))  # marks drawn in axes coordinates do not widen the limits
    ax.set_xlim(min(xs) - pad, max(xs) + pad)
    ax.set_xlabel(data.x_label)
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    ax.set_title("accuracy vs latency")
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def accuracy_latency_html(data: ChartData, path: Path) -> None:
    fig = go.Figure()
    accs = [p.val_acc for p in (*data.complete, *data.pruned) if p.val_acc is not None]
    low = (min(accs) - 0.05 * (max(accs) - min(accs) or 1.0)) if accs else 0.0
    if data.front:
        fig.add_scatter(x=[p.latency_ms for p in data.front], y=[p.val_acc for p in data.front], mode="lines",
                        line={"shape": "hv", "color": "green"}, name="feasible front")  # fmt: skip

    def add(points: list[Point], name: str, marker: dict, y: list[float | None]) -> None:
        if points:
            text = [f"trial {p.number}" + (f" ({p.label})" if p.label else "") for p in points]
            fig.add_scatter(x=[p.latency_ms for p in points], y=y, mode="markers", name=name, marker=marker, text=text,
                            hovertemplate="%{text}<br>%{x:.3f} ms<br>val_acc %{y:.4f}<extra></extra>")  # fmt: skip

    add(data.complete, f"trained ({len(data.complete)})", {"size": 8, "color": "royalblue"},
        [p.val_acc for p in data.complete])  # fmt: skip
    add(data.pruned, f"pruned, at its last epoch ({len(data.pruned)})",
        {"size": 9, "symbol": "triangle-down-open", "color": "gray"}, [p.val_acc for p in data.pruned])  # fmt: skip
    add(data.over_budget, _over_budget_label(data),
        {"size": 14, "symbol": "line-ns-open", "color": "crimson"}, [low] * len(data.over_budget))  # fmt: skip
    labelled = _labelled(data)
    if labelled:
        fig.add_scatter(x=[p.latency_ms for p in labelled], y=[p.val_acc if p.val_acc is not None else low
                        for p in labelled], mode="markers+text", text=[p.label for p in labelled],
                        textposition="top right", marker={"symbol": "star", "size": 16, "color": "black"},
                        name="references")  # fmt: skip
    if data.budget_ms is not None:
        fig.add_vline(x=data.budget_ms, line_dash="dash", line_color="crimson",
                      annotation_text=f"{data.budget_label} {data.budget_ms} ms")  # fmt: skip
    fig.update_layout(title="accuracy vs latency", xaxis_title=data.x_label, yaxis_title="validation accuracy",
                      width=1000, height=600)  # fmt: skip
    fig.write_html(str(path), include_plotlyjs="cdn")


def _group(name: str) -> str:
    stage = re.match(r"s(\d+)\.", name)
    return f"stage {stage.group(1)}" if stage else "other"


def grouped_importances(importances: dict[str, float], named: int = NAMED_IMPORTANCES) -> list[tuple[str, float]]:
    """The ``named`` most important choices by name, the rest summed per stage; most important first."""
    ranked = sorted(importances.items(), key=lambda kv: -kv[1])
    out = list(ranked[:named])
    groups: dict[str, list[float]] = {}
    for name, value in ranked[named:]:
        groups.setdefault(_group(name), []).append(value)
    out += [(f"{g}: {len(v)} other choice{'s' if len(v) > 1 else ''}", sum(v)) for g, v in groups.items()]
    return sorted(out, key=lambda kv: -kv[1])


def _scored_view(study: optuna.Study, goal: StudyObjective, searched_only: bool) -> optuna.Study:
    """Trained networks only, each with its objective score as the single value (in-memory study)."""
    view = optuna.create_study(direction="maximize", study_name=f"{study.study_name}-trained")
    for t in sorted(trial_states.complete(study), key=lambda t: t.number):
        if searched_only and not t.params:  # references sample nothing
            continue
        view.add_trial(optuna.trial.create_trial(value=goal.trial_score(t), params=t.params,
                                                 distributions=t.distributions, user_attrs=t.user_attrs))  # fmt: skip
    return view


def importances(study: optuna.Study, goal: StudyObjective) -> list[tuple[str, float]]:
    view = _scored_view(study, goal, searched_only=True)
    if len(view.trials) < 2:
        return []
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return grouped_importances(optuna.importance.get_param_importances(view, evaluator=evaluator))
    except (ValueError, RuntimeError):  # no parameter common to all trials, or all values equal
        return []


def importances_png(values: list[tuple[str, float]], path: Path, target: str) -> None:
    with plt.style.context("default"):
        _draw_importances(values, path, target)


def _draw_importances(values: list[tuple[str, float]], path: Path, target: str) -> None:
    fig, ax = plt.subplots(figsize=SIZE_IN)
    names, vals = [n for n, _ in values][::-1], [v for _, v in values][::-1]
    bars = ax.barh(names, vals, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in vals], padding=3, fontsize=9)
    ax.set_xlim(0, max(vals) * 1.15 if vals else 1)
    ax.set_xlabel(f"importance for {target}")
    ax.set_title("what matters")
    ax.tick_params(axis="y", labelsize=10)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def importances_html(values: list[tuple[str, float]], path: Path, target: str) -> None:
    names, vals = [n for n, _ in values][::-1], [v for _, v in values][::-1]
    fig = go.Figure(go.Bar(x=vals, y=names, orientation="h", text=[f"{v:.3f}" for v in vals], textposition="outside"))
    fig.update_layout(title="what matters", xaxis_title=f"importance for {target}",
                      width=1000, height=600, margin={"l": 260})  # fmt: skip
    fig.write_html(str(path), include_plotlyjs="cdn")


def _history(view: optuna.Study, out: Path, target: str) -> list[Path]:
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_mpl

    html, png = out / "optimization_history.html", out / "optimization_history.png"
    vis.plot_optimization_history(view, target_name=target).write_html(str(html), include_plotlyjs="cdn")
    ax = vis_mpl.plot_optimization_history(view, target_name=target)
    ax.figure.set_size_inches(*SIZE_IN)
    ax.figure.savefig(png, dpi=DPI, bbox_inches="tight")
    plt.close("all")
    return [html, png]


def study_plots(study: optuna.Study, out: Path, goal: StudyObjective) -> list[Path]:
    """Write the study's charts to ``out``; returns the files (a chart that needs more trials is skipped)."""
    out.mkdir(parents=True, exist_ok=True)
    data = chart_data(study, goal)
    if not (data.complete or data.pruned or data.over_budget):
        return []
    files = [out / "accuracy_vs_latency.png", out / "accuracy_vs_latency.html"]
    accuracy_latency_png(data, files[0])
    accuracy_latency_html(data, files[1])
    target = "val_acc" if goal.score_is_accuracy or isinstance(goal, ParetoObjective) else "objective"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the matplotlib variants are "experimental"
        view = _scored_view(study, goal, searched_only=False)
        if view.trials:
            files += _history(view, out, target)
        searched = len(_scored_view(study, goal, searched_only=True).trials)
        values = importances(study, goal) if searched >= MIN_IMPORTANCE_NETWORKS else []
    if searched < MIN_IMPORTANCE_NETWORKS:
        print(f"  what-matters chart not drawn: {searched} trained network(s) sampled by the search, fewer than the "
              f"{MIN_IMPORTANCE_NETWORKS} its fANOVA importances need to mean anything", flush=True)  # fmt: skip
    elif values:
        files += [out / "param_importances.png", out / "param_importances.html"]
        basis = f"{target} (fANOVA over {searched} trained networks)"
        importances_png(values, files[-2], basis)
        importances_html(values, files[-1], basis)
    return files
