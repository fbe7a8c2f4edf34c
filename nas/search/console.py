"""What the user reads during and after a search: one line per trial, then a summary."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial

from nas import trial_states
from nas.cli import CONF_DIR, default_tracking_uri
from nas.objectives import StudyObjective
from nas.search.finalists import Finalist, RoundOutcome, versus
from nas.search.objective import TrialOutcome
from nas.train.progress import human_duration
from nas.train.run import recipe, recipe_overrides
from nas.urls import mask_url

DEFAULT_STORAGE = "sqlite:///outputs/optuna.db"


def default_batch_size(data: DictConfig) -> int:
    """What ``train.batch_size`` is for this data set when nobody sets it (conf/train/default.yaml's rule)."""
    rule = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "train" / "default.yaml"))["batch_size"]
    return int(OmegaConf.create({"data": OmegaConf.to_container(data, resolve=True), "batch_size": rule}).batch_size)


def retrain_command(cfg: DictConfig, study_name: str) -> str:
    """The retrain command for this study, with the settings it needs to find the study and train alike."""
    parts = [f"python -m nas.retrain study.name={study_name}", f"data={cfg.data.name}"]
    root = cfg.data.get("root")
    if root not in (None, "data"):
        parts.append(f"data.root={root}")
    if cfg.data.loader.get("image_size") is not None:  # a folder decoded at another size is other data
        parts.append(f"data.image_size={cfg.data.loader.image_size}")
    parts.append(recipe_overrides(recipe(cfg)))
    if int(cfg.train.batch_size) != default_batch_size(cfg.data):
        parts.append(f"train.batch_size={int(cfg.train.batch_size)}")
    if str(cfg.study.storage) != DEFAULT_STORAGE:
        parts.append(f"study.storage={mask_url(str(cfg.study.storage))}")
    if str(cfg.mlflow.tracking_uri) != default_tracking_uri():
        parts.append(f"mlflow.tracking_uri={mask_url(str(cfg.mlflow.tracking_uri))}")
    return " ".join(p for p in parts if p)


def retrain_lines(cfg: DictConfig, study_name: str, epoch_seconds: float | None) -> list[str]:
    """The next steps: a short retrain to try (the trials' epochs, not registered), then the full recipe, each
    with how long it should take at the winner's own pace in the search."""
    full = int(OmegaConf.load(Path(CONF_DIR) / "retrain_app.yaml").train.epochs)
    short, command = int(cfg.train.epochs), retrain_command(cfg, study_name)

    def pace(epochs: int) -> str:
        return f", about {human_duration(epochs * epoch_seconds)} at the trials' pace" if epoch_seconds else ""

    return [
        f"try a retrain: {command} train.epochs={short} retrain.register=false   ({short} epoch"
        f"{'s' * (short != 1)}{pace(short)}; not registered)",
        f"retrain best:  {command}   (the full recipe: {full} epochs{pace(full)}; registered as @champion)",
    ]


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def human_count(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n / 1e3:.1f}K"


def trial_line(
    outcome: TrialOutcome, done: int, total: int, best: FrozenTrial | None, goal: StudyObjective, over_budget: int = 0
) -> str:
    """``[done/total]`` counts trained networks; draws over the budget are counted at the end of the line."""
    tag = f" [{outcome.reference}]" if outcome.reference else ""
    best_txt = f"best {goal.trial_score(best):.4f} (#{best.number})" if best else "best -"
    acc = _fmt(outcome.val_acc, ".4f")
    if outcome.state == trial_states.PRUNED and outcome.epochs:
        acc += f"@{outcome.epochs}"  # the accuracy at the epoch it was stopped
    line = (
        f"[{done:>{len(str(total))}}/{total}] trial {outcome.number:>3} {outcome.state:<9} "
        f"val_acc {acc:>8}  latency {_fmt(outcome.latency_ms, '.3f'):>7} ms  "
        f"{human_count(outcome.params):>6} params  {outcome.seconds:6.1f}s  {best_txt}{tag}"
    )
    if over_budget:
        line += f"  ({over_budget} over budget)"
    if outcome.reason:
        line += f"\n      reason: {outcome.reason}"
    return line


class DrawReporter:
    """Draws over the budget take a fraction of a second each and may outnumber the trained networks:
    they are not printed one by one but summarised, at most every ``every_s`` seconds and before the
    next trained network's line. A draw is a trial over the budget or one refused before a trial."""

    def __init__(self, budget_ms: float | None, every_s: float = 15.0) -> None:
        self.budget_ms = budget_ms
        self.every_s = every_s
        self.streak = 0  # consecutive draws over the budget
        self.fastest: float | None = None  # the fastest draw of the streak
        self.pending, self.pending_fastest, self.pending_refs = 0, None, []  # since the last summary line
        self.last_print = time.monotonic()

    def reset(self) -> None:
        self.streak, self.fastest = 0, None

    def add(self, outcome: TrialOutcome) -> None:
        """The draws refused before this trial, and the trial itself when it is over the budget."""
        latencies = [outcome.refused.fastest[0]] if outcome.refused.fastest else []
        over = outcome.state == trial_states.OVER_BUDGET
        if over and outcome.latency_ms is not None:
            latencies.append(outcome.latency_ms)
        if over and outcome.reference:
            self.pending_refs.append(outcome.reference)
        n = outcome.refused.count + over
        if not n:
            return
        self.streak += n
        self.pending += n
        fastest = min(latencies, default=None)
        if fastest is not None:
            self.fastest = min(fastest, self.fastest or fastest)
            self.pending_fastest = min(fastest, self.pending_fastest or fastest)
        if time.monotonic() - self.last_print >= self.every_s:
            print(self.flush().rstrip("\n"), flush=True)

    def flush(self) -> str:
        """The summary line of the draws since the last one (with its newline), or ''."""
        self.last_print = time.monotonic()
        if not self.pending:
            return ""
        refs = self.pending_refs
        fastest = "" if self.pending_fastest is None else f"fastest {self.pending_fastest:.3f} ms"
        text = (
            f"      {self.pending} draw(s) over the {self.budget_ms} ms budget, not trained "
            f"({fastest}{'; ' + ', '.join(refs) if refs else ''})\n"
        )
        self.pending, self.pending_fastest, self.pending_refs = 0, None, []
        return text

    def give_up_message(self, trained: int, target: int, limit: int) -> str:
        self.flush()
        fastest = "" if self.fastest is None else f", the fastest {self.fastest:.4f} ms"
        return (
            f"no architecture met the latency budget of {self.budget_ms} ms in the last {self.streak} draws "
            f"(search.max_draws_over_budget={limit}{fastest}; {trained}/{target} networks trained). Raise "
            f"latency.budget_ms, use a smaller space, or raise search.max_draws_over_budget"
        )


def summary_line(name: str, counts: dict[str, int]) -> str:
    trained = counts[trial_states.COMPLETE] + counts[trial_states.PRUNED]
    return (
        f"study {name}: {trained} trained ({counts[trial_states.COMPLETE]} complete, {counts[trial_states.PRUNED]} "
        f"pruned), {counts[trial_states.OVER_BUDGET]} over budget (not trained), {counts[trial_states.FAILED]} failed"
    )


def summary_table(trials: Sequence[FrozenTrial], goal: StudyObjective, limit: int = 5) -> str:
    score = not goal.score_is_accuracy  # the ranking value differs from val_acc: show it
    head = f"{'trial':>5}  {'objective':>9}  " if score else f"{'trial':>5}  "
    rows = [head + f"{'val_acc':>7}  {'latency_ms':>10}  {'params':>7}  {'MFLOPs':>7}  arch"]
    for t in trials[:limit]:
        ua = t.user_attrs
        name = f" ({ua['reference']})" if ua.get("reference") else ""
        lead = f"{t.number:>5}  {goal.trial_score(t):>9.4f}  " if score else f"{t.number:>5}  "
        rows.append(
            lead + f"{ua['val_acc']:>7.4f}  {ua['latency_ms']:>10.3f}  {human_count(ua['params']):>7}  "
            f"{ua['flops'] / 1e6:>7.1f}  {ua['arch']}{name}"
        )
    return "\n".join(rows)


def _accuracy(f: Finalist) -> str:
    interval = f.interval
    return f"{f.mean:.4f} {interval.text()}" if interval else f"{f.mean:.4f} (one seed)"


def _latency(f: Finalist) -> str:
    c = f.candidate
    if f.measured_ms is None:
        return f"{c.predicted_ms:.3f} (fidelity sample: not measured)"
    latency = f"{c.predicted_ms:.3f} -> {f.measured_ms:.3f} ({f.p10_ms:.3f}-{f.p90_ms:.3f})"
    return latency + (" OVER" if f.over_budget else "")


def round_summary(outcome: RoundOutcome, goal: StudyObjective) -> list[str]:
    """The round's table with intervals and paired verdicts, the winner, and the proxy's fidelity."""
    s, lat = outcome.settings, outcome.latency
    where = f"{lat.runtime.label()} on {lat.device_name()}, batch {lat.batch_size}"
    seeds = ", ".join(map(str, outcome.seeds))
    lines = [f"finalists ({s.seeds} seed(s) x {s.epochs} epochs, seeds {seeds} shared by every network; "
             f"latency measured in {where}):"]  # fmt: skip
    lines.append(
        f"{'trial':>5}  {'search_acc':>10}  {'final_acc mean [95% interval]':<29}  "
        f"{'latency ms: predicted -> measured (p10-p90)':<44}  {'params':>6}  "
        f"vs references: paired difference [95% interval], p-value; verdict at alpha {s.alpha:g}, Holm over the table"
    )
    for f in outcome.finalists:
        c = f.candidate
        mark = "*" if f is outcome.winner else " "
        against = ", ".join(cmp.text() for cmp in outcome.comparisons.get(c.trial, [])) or "-"
        role = f"  [{c.reference}]" if c.reference else "  [fidelity sample]" if c.sample else ""
        lines.append(
            f"{c.trial:>4}{mark}  {c.search_acc:>10.4f}  {_accuracy(f):<29}  {_latency(f):<44}  "
            f"{human_count(c.params):>6}  {against}{role}"
        )
    for failure in outcome.failed:
        lines.append(f"  not finished: {failure}")
    if outcome.winner:
        w = outcome.winner
        budget = f" within the {goal.budget_ms:g} ms budget" if goal.hard_budget else ""
        lines.append(
            f"winner: {w.candidate.name} (*): {_accuracy(w)} over {len(w.accs)} run(s), measured "
            f"{w.measured_ms:.3f} ms{budget}: nas.retrain select=best retrains it"
        )
        if outcome.runner_up is not None:
            ahead = versus(w, outcome.runner_up, s.alpha)
            meaning = {"beats": "more than noise", "ties": "within noise"}.get(ahead.verdict, "no test")
            lines.append(f"  ahead of the runner-up: {ahead.text()}: {meaning} at alpha {s.alpha:g}")
    elif outcome.finalists:
        lines.append(
            f"no finalist's measured latency is within the {goal.budget_ms:g} ms budget: the latency estimate is "
            "optimistic here (check it: python -m nas.latency validate); nas.retrain select=best has nothing to "
            "retrain (more finalists: search.finalists=N; the search's best anyway: select=search)"
        )
    else:
        lines.append("no finalist run finished (reasons above): nas.retrain falls back to the search's best")
    lines.append(outcome.fidelity.line())
    return lines
