"""The finalist round: the search's best networks and the space's yardsticks trained again, longer and with
several seeds, their latency measured, one winner within the budget.

Why: the search's best trial won one short, single-seed run at a latency that may have been predicted. The
maximum of many noisy runs is the luckiest one, and the trial closest under the budget is the one whose
latency was most under-predicted. Training the few best again, with the references beside them under the
same recipe, tells which network is better and whether the search beat the hand-designed ones; the rank
correlation between the two rounds (Kendall's tau) tells how far the short runs can be trusted.

Each finalist training run (a network and a seed) is a queued trial of a second Optuna study,
``<study>.finalists``, in the same storage: finished runs are kept across reruns, a killed run's heartbeat
puts it back in the queue, and worker processes share the queue exactly as they share the search.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState
from scipy.stats import kendalltau

from nas import trial_states
from nas.data import TensorImageDataModule
from nas.errors import NasError
from nas.interrupts import Interrupted
from nas.latency.measure import LatencySettings, LatencyStats, measure_arch
from nas.objectives import StudyObjective
from nas.search.objective import failure_reason, free_trial_memory
from nas.search.study import worker_index
from nas.search.waiting import RunningTrialsWait
from nas.space import decode
from nas.studies import FINALISTS_SUFFIX, ROUND_ATTR
from nas.tracking.trials import EpochMetricsToMlflow, StudyTracker, TrackingError
from nas.train.progress import EpochLines
from nas.train.run import apply_hparams, train_arch

DataModules = Callable[[DictConfig, int], TensorImageDataModule]  # (run config, resolution) -> data
# A CPU latency median moves by up to ~25 % between moments on a shared machine (measured: the same network
# 1.95 ms in the search, 2.45 ms minutes later); passes interleaved over the finalists spread that over all.
MEASURE_PASSES = 3
LATENCY_PASS_ATTR = "latency"  # on the round's study: the last measurement of the finalists, taken together


@dataclass(frozen=True)
class RoundSettings:
    """``search.finalists`` best trials (0: no round), each trained ``finalist_seeds`` times for
    ``finalist_epochs`` (null: three times ``train.epochs``)."""

    count: int
    epochs: int
    seeds: int

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> RoundSettings:
        s = cfg.search
        epochs = s.get("finalist_epochs")
        values = {
            "finalists": s.get("finalists", 0),
            "finalist_epochs": 3 * int(cfg.train.epochs) if epochs is None else epochs,
            "finalist_seeds": s.get("finalist_seeds", 2),
        }
        for key, value in values.items():
            low = 0 if key == "finalists" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise NasError(f"search.{key}={value!r} must be a whole number >= {low}")
        return cls(values["finalists"], values["finalist_epochs"], values["finalist_seeds"])


@dataclass(frozen=True)
class Candidate:
    """A trained trial of the search that goes to the round: one of the best, or a reference."""

    trial: int
    arch: str
    hparams: dict[str, Any]
    reference: str | None
    search_acc: float
    predicted_ms: float
    params: int

    @property
    def name(self) -> str:
        return self.reference or f"trial {self.trial}"


def pick_candidates(study: optuna.Study, goal: StudyObjective, count: int) -> list[Candidate]:
    """The ``count`` best feasible trials by the search objective, then every trained reference."""
    ranked = goal.ranked(study)
    chosen = ranked[:count] + [t for t in ranked[count:] if t.user_attrs.get("reference")]
    keys = set(study.user_attrs.get("identity", {}).get("search.hparams") or {})
    return [
        Candidate(
            trial=t.number,
            arch=str(t.user_attrs["arch"]),
            hparams={k: v for k, v in t.params.items() if k in keys},
            reference=t.user_attrs.get("reference"),
            search_acc=float(t.user_attrs["val_acc"]),
            predicted_ms=float(t.user_attrs["latency_ms"]),
            params=int(t.user_attrs["params"]),
        )
        for t in chosen
    ]


def job_key(trial: int, seed: int, epochs: int) -> str:
    return f"{trial}/{seed}/{epochs}"


def open_round_study(study: optuna.Study, storage: Any, seed: int) -> optuna.Study:
    """The round's queue; every run in it is enqueued, so the sampler never proposes anything."""
    return optuna.create_study(
        study_name=study.study_name + FINALISTS_SUFFIX,
        storage=storage,
        sampler=optuna.samplers.RandomSampler(seed=seed),
        direction="maximize",
        load_if_exists=True,
    )


class SkippedJob(Exception):
    """Asked for a run after another worker took the last one: nothing to train."""


class FailedJob(Exception):
    """A finalist run that could not finish (non-finite loss, out of memory): recorded, the round goes on."""


@dataclass
class JobOutcome:
    name: str
    seed: int
    val_acc: float | None
    seconds: float
    reason: str | None = None


@dataclass
class FinalistTraining:
    """Callable for ``optimize`` on the round's study: trains one queued (network, seed) run."""

    cfg: DictConfig
    tracker: StudyTracker
    datamodules: DataModules
    outcomes: list[JobOutcome] = field(default_factory=list)

    def run_config(self, attrs: dict[str, Any]) -> DictConfig:
        out = apply_hparams(self.cfg, attrs["hparams"])
        OmegaConf.update(out, "train.epochs", int(attrs["epochs"]), merge=False)
        OmegaConf.update(out, "seed", int(attrs["seed"]), merge=False)
        return out

    def __call__(self, trial: optuna.Trial) -> float:
        attrs = trial.user_attrs
        if "key" not in attrs:  # the queue was empty when this process asked: another one took the last run
            trial.set_user_attr("state", trial_states.SURPLUS)
            raise SkippedJob(f"finalist run {trial.number}: the queue was already empty")
        t0, name = time.perf_counter(), attrs["name"]
        trial.set_user_attr("worker", worker_index(self.cfg))
        outcome = JobOutcome(name, int(attrs["seed"]), None, 0.0)
        self.outcomes.append(outcome)
        run_id = None
        try:
            cfg = self.run_config(attrs)
            params = {"arch": attrs["arch"], "seed": attrs["seed"], "train.epochs": attrs["epochs"], **attrs["hparams"]}
            run_id = self.tracker.start_finalist_seed(attrs["run_id"], int(attrs["trial"]), int(attrs["seed"]), params)
            arch = decode(attrs["arch"])
            dm = self.datamodules(cfg, arch.resolution)  # its batch order and augmentation follow the run's seed
            lines = EpochLines(f"      {name} seed {attrs['seed']} ", float(self.cfg.search.get("progress_s", 30)))
            callbacks = [EpochMetricsToMlflow(self.tracker.client, run_id), lines]
            result = train_arch(cfg, arch, dm, callbacks=callbacks)
        except (Interrupted, KeyboardInterrupt) as exc:
            self._end(run_id, "killed", "KILLED", "interrupted")
            raise KeyboardInterrupt("interrupted") from exc  # Optuna records FAIL; a rerun trains it again
        except Exception as exc:
            outcome.reason = failure_reason(exc)
            trial.set_user_attr("fail_reason", outcome.reason)
            self._end(run_id, trial_states.FAILED, "FAILED", outcome.reason)
            raise FailedJob(outcome.reason) from exc
        finally:
            outcome.seconds = time.perf_counter() - t0
        outcome.val_acc = result.val_acc
        trial.set_user_attr("val_acc", result.val_acc)
        self._end(run_id, trial_states.COMPLETE, "FINISHED", None)
        return result.val_acc

    def _end(self, run_id: str | None, state: str, status: str, reason: str | None) -> None:
        if run_id is not None:
            with contextlib.suppress(TrackingError):  # the result is in the study either way
                self.tracker.end_trial(run_id, state, status, reason)


def work_through(round_study: optuna.Study, training: FinalistTraining, storage: Any, heartbeat_s: int) -> None:
    """Train queued runs until none waits, then wait for those that other processes still train."""
    wait = RunningTrialsWait(storage, round_study.study_name, heartbeat_s, announce=False)
    while True:
        optuna.storages.fail_stale_trials(round_study)  # a killed worker's run goes back into the queue
        if round_study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            wait.reset()
            round_study.optimize(training, n_trials=1, catch=(FailedJob, SkippedJob), gc_after_trial=False)
            free_trial_memory()
            if training.outcomes:
                print(_job_line(training.outcomes[-1], round_study), flush=True)
                training.outcomes.clear()
            continue
        running = [t.number for t in round_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        if not running:
            return
        wait.step(running)


def _job_line(o: JobOutcome, round_study: optuna.Study) -> str:
    finished = round_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    done = sum(1 for t in finished if "key" in t.user_attrs)
    result = f"val_acc {o.val_acc:.4f}" if o.val_acc is not None else f"failed: {o.reason}"
    return f"  finalist {o.name} seed {o.seed}: {result}  {o.seconds:.1f}s  ({done} finalist runs done)"


@dataclass
class Finalist:
    """One candidate after the round: its seeds' accuracies and its measured latency."""

    candidate: Candidate
    accs: list[float]
    measured_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    over_budget: bool = False

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accs)

    @property
    def sd(self) -> float:
        """The seeds' sample standard deviation (0 with one seed: no spread known)."""
        return statistics.stdev(self.accs) if len(self.accs) > 1 else 0.0


def compare(finalist: Finalist, reference: Finalist) -> tuple[float, str]:
    """Mean accuracy difference and a verdict: ``beats`` / ``loses`` only by more than both seeds' spread."""
    diff = finalist.mean - reference.mean
    spread = finalist.sd + reference.sd
    return diff, "beats" if diff > spread else "loses" if diff < -spread else "ties"


@dataclass
class RoundOutcome:
    settings: RoundSettings
    finalists: list[Finalist]
    winner: Finalist | None
    kendall_tau: float | None
    failed: list[str]  # finalist runs that did not finish, with their reasons
    latency: LatencySettings
    runs: dict[int, str] = field(default_factory=dict)  # candidate trial -> its finalist MLflow run
    unfinished: list[int] = field(default_factory=list)  # candidates without one finished run

    @property
    def no_winner_reason(self) -> str | None:
        if self.winner is not None:
            return None
        if not self.finalists:
            return "no finalist run finished"
        return "no finalist met the latency budget when measured"

    @property
    def references(self) -> list[Finalist]:
        return [f for f in self.finalists if f.candidate.reference]

    def rows(self) -> list[dict[str, Any]]:
        """One row per finalist: its candidate and its figures."""
        return [
            {**asdict(f.candidate), "val_acc_mean": f.mean, "val_acc_std": f.sd, "runs": len(f.accs),
             "measured_ms": f.measured_ms, "p10_ms": f.p10_ms, "p90_ms": f.p90_ms, "over_budget": f.over_budget}
            for f in self.finalists
        ]  # fmt: skip

    def record(self, trained: int) -> dict[str, Any]:
        """What the search study keeps (read by ``nas.retrain select=best`` through ``nas.studies``)."""
        return {
            "winner": self.winner.candidate.trial if self.winner else None,
            "no_winner_reason": self.no_winner_reason,
            "trained": trained,
            "kendall_tau": self.kendall_tau,
            "finalists": self.settings.count,
            "epochs": self.settings.epochs,
            "seeds": self.settings.seeds,
            "candidates": self.rows(),
        }


def rank_correlation(finalists: list[Finalist]) -> float | None:
    """Kendall's tau between search accuracy and finalist mean accuracy; None where it is undefined."""
    if len(finalists) < 2:
        return None
    tau = kendalltau([f.candidate.search_acc for f in finalists], [f.mean for f in finalists]).statistic
    return float(tau) if tau is not None and math.isfinite(tau) else None


def pick_winner(finalists: list[Finalist], goal: StudyObjective) -> Finalist | None:
    """The best mean accuracy (by the study's objective, at the measured latency) within the budget."""
    eligible = [f for f in finalists if not f.over_budget]
    if not eligible:
        return None
    return max(eligible, key=lambda f: (goal.score(f.mean, f.measured_ms), -f.candidate.trial))  # type: ignore[arg-type]


@dataclass
class FinalistRound:
    """The round as the main process runs it: queue the runs, let them train, conclude."""

    cfg: DictConfig
    study: optuna.Study
    tracker: StudyTracker
    goal: StudyObjective
    settings: RoundSettings
    latency: LatencySettings
    num_classes: int
    storage: Any
    candidates: list[Candidate] = field(default_factory=list)
    round_study: optuna.Study | None = None

    def plan(self) -> dict[str, Candidate]:
        """The round's runs for today's candidates and settings: job key -> candidate."""
        return {job_key(c.trial, int(self.cfg.seed) + s, self.settings.epochs): c for c in self.candidates
                for s in range(self.settings.seeds)}  # fmt: skip

    def prepare(self) -> int:
        """Queue every run of the plan not already finished or queued, after dropping queued runs that are no
        longer in it (another finalists/seeds/epochs setting, a study that grew); returns how many are finished."""
        self.candidates = pick_candidates(self.study, self.goal, self.settings.count)
        if not self.candidates:
            return 0
        self.round_study = rs = open_round_study(self.study, self.storage, int(self.cfg.seed))
        optuna.storages.fail_stale_trials(rs)
        plan = self.plan()
        self._drop_stale(plan)
        trials = rs.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING))
        have = {t.user_attrs.get("key") for t in trials}
        finished = {t.user_attrs.get("key") for t in trials if t.state == TrialState.COMPLETE}
        runs = {c.trial: self._finalist_run(c) for c in self.candidates}
        for key, c in plan.items():
            if key in have:
                continue
            attrs = {"key": key, "trial": c.trial, "seed": int(key.split("/")[1]), "epochs": self.settings.epochs,
                     "arch": c.arch, "hparams": c.hparams, "name": c.name, "run_id": runs[c.trial]}  # fmt: skip
            rs.enqueue_trial({}, user_attrs=attrs, skip_if_exists=False)
        return len(finished & set(plan))

    def _drop_stale(self, plan: dict[str, Candidate]) -> None:
        """Queued runs outside the plan are failed (``state=stale``) before anyone trains them; a run that a
        worker has started already is left to finish and is not counted."""
        assert self.round_study is not None
        waiting = self.round_study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        stale = [t for t in waiting if t.user_attrs.get("key") not in plan]
        for t in stale:  # Optuna has no public call to end a queued trial: its storage's, by the trial's id
            if self.storage.get_trial(t._trial_id).state != TrialState.WAITING:
                continue  # a worker of the round (started by hand) has just taken it: it trains and is ignored
            self.storage.set_trial_user_attr(t._trial_id, "state", trial_states.STALE)
            self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        if stale:
            names = sorted({f"{t.user_attrs.get('name')} seed {t.user_attrs.get('seed')} x {t.user_attrs.get('epochs')}"
                            for t in stale})  # fmt: skip
            print(f"  dropped {len(stale)} queued finalist run(s) no longer in the round: {'; '.join(names)}",
                  flush=True)  # fmt: skip

    def _finalist_run(self, c: Candidate) -> str | None:
        """The candidate's MLflow run for these settings, created once and reopened on a rerun."""
        assert self.round_study is not None
        attr = f"run:{c.trial}@{self.settings.epochs}"
        run_id = self.round_study.user_attrs.get(attr)
        try:
            if run_id is None:
                params = {"arch": c.arch, "finalist_epochs": self.settings.epochs, **c.hparams}
                tags = {"nas.reference": c.reference} if c.reference else {}
                run_id = self.tracker.start_finalist(c.trial, params, tags)
                self.round_study.set_user_attr(attr, run_id)
            else:
                self.tracker.reopen(run_id)
        except TrackingError as exc:
            print(f"  finalist {c.name}: not recorded in MLflow ({exc})", flush=True)
        return run_id

    def runs(self) -> dict[int, str]:
        """Each candidate's finalist run id (where MLflow could create one)."""
        assert self.round_study is not None
        attrs, epochs = self.round_study.user_attrs, self.settings.epochs
        ids = {c.trial: attrs.get(f"run:{c.trial}@{epochs}") for c in self.candidates}
        return {trial: run_id for trial, run_id in ids.items() if run_id}

    def describe(self, done: int) -> str:
        best = {t.number for t in self.goal.ranked(self.study)[: self.settings.count]}
        among = [c.reference for c in self.candidates if c.reference and c.trial in best]
        extra = [c.reference for c in self.candidates if c.reference and c.trial not in best]
        who = f"the {len(best)} best trial(s)" + (f", {', '.join(among)} among them" if among else "")
        who += f", and the reference(s) {', '.join(extra)}" if extra else ""  # type: ignore[arg-type]
        total = len(self.candidates) * self.settings.seeds
        return (
            f"\nfinalist round: {len(self.candidates)} networks ({who}) x {self.settings.seeds} seed(s) x "
            f"{self.settings.epochs} epochs: {total} runs, {done} already done"
        )

    def conclude(self) -> RoundOutcome:
        """Collect the runs, measure each finalist's latency, pick the winner, record everything."""
        assert self.round_study is not None
        finalists, failed = self._collect()
        self._measure(finalists)
        for f in finalists:
            f.over_budget = self.goal.is_over_budget(f.measured_ms)  # type: ignore[arg-type]
        outcome = RoundOutcome(
            self.settings,
            finalists,
            pick_winner(finalists, self.goal),
            rank_correlation(finalists),
            failed,
            self.latency,
            unfinished=[c.trial for c in self.candidates if c.trial not in {f.candidate.trial for f in finalists}],
        )
        self.study.set_user_attr(ROUND_ATTR, outcome.record(trial_states.count_trained(self.study)))
        with contextlib.suppress(TrackingError):  # the outcome is in the study; the summary says if MLflow failed
            self.tracker.close_orphan_seed_runs()
        return outcome

    def _collect(self) -> tuple[list[Finalist], list[str]]:
        """Each planned run's accuracy; the failures of planned runs that never finished since (the latest
        reason of each), not those a rerun has made good."""
        assert self.round_study is not None
        accs: dict[int, list[float]] = {c.trial: [] for c in self.candidates}
        plan = self.plan()
        finished, failures = set(), {}
        for t in self.round_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
            key = t.user_attrs.get("key")
            if key not in plan:
                continue
            if t.state == TrialState.COMPLETE:
                finished.add(key)
                accs[plan[key].trial].append(float(t.user_attrs["val_acc"]))
            elif t.user_attrs.get("fail_reason"):
                failures[key] = f"{plan[key].name} seed {t.user_attrs['seed']}: {t.user_attrs['fail_reason']}"
        failed = [reason for key, reason in failures.items() if key not in finished]
        return [Finalist(c, accs[c.trial]) for c in self.candidates if accs[c.trial]], failed

    def _measure(self, finalists: list[Finalist]) -> None:
        """Measured on the target with the study's settings, all finalists together in ``MEASURE_PASSES``
        interleaved passes: the median of the passes' medians, and the p10-p90 across them. Figures of another
        run of the command are never mixed in (the machine drifts between moments): a rerun reuses the stored
        figures only when they were taken for exactly these finalists with these settings."""
        assert self.round_study is not None
        key, trials = self.latency.key_fields(), sorted(f.candidate.trial for f in finalists)
        stored = self.round_study.user_attrs.get(LATENCY_PASS_ATTR)
        if not stored or stored.get("key") != key or stored.get("trials") != trials:
            passes: dict[int, list[LatencyStats]] = {f.candidate.trial: [] for f in finalists}
            for _ in range(MEASURE_PASSES):
                for f in finalists:
                    arch = decode(f.candidate.arch)
                    passes[f.candidate.trial].append(measure_arch(arch, self.num_classes, self.latency))
            figures = {str(trial): {"median_ms": statistics.median(s.median_ms for s in stats),
                                    "p10_ms": min(s.p10_ms for s in stats), "p90_ms": max(s.p90_ms for s in stats)}
                       for trial, stats in passes.items()}  # fmt: skip
            stored = {"key": key, "trials": trials, "figures": figures}
            self.round_study.set_user_attr(LATENCY_PASS_ATTR, stored)
        for f in finalists:
            figure = stored["figures"][str(f.candidate.trial)]
            f.measured_ms, f.p10_ms, f.p90_ms = figure["median_ms"], figure["p10_ms"], figure["p90_ms"]


def log_round(tracker: StudyTracker, outcome: RoundOutcome) -> None:
    """Each finalist's run gets its figures and ends; the study's run gets the table and the proxy's tau."""
    winner = outcome.winner.candidate.trial if outcome.winner else None
    for f in outcome.finalists:
        run_id = outcome.runs.get(f.candidate.trial)
        if run_id is None:
            continue
        tracker.log_metrics(run_id, {
            "val_acc_mean": f.mean, "val_acc_std": f.sd, "val_acc_search": f.candidate.search_acc,
            "latency_ms_measured": f.measured_ms, "latency_ms_p10": f.p10_ms, "latency_ms_p90": f.p90_ms,
            "latency_ms_predicted": f.candidate.predicted_ms, "seeds_trained": len(f.accs),
        })  # fmt: skip
        tracker.set_tags(run_id, {"nas.finalist.winner": str(f.candidate.trial == winner).lower(),
                                  "nas.finalist.over_budget": str(f.over_budget).lower()})  # fmt: skip
        tracker.end_trial(run_id, "complete", "FINISHED")
    for trial in outcome.unfinished:
        if trial in outcome.runs:
            tracker.end_trial(outcome.runs[trial], trial_states.FAILED, "FAILED", "no finalist run finished")
    if not tracker.parent_run_id:
        return
    metrics: dict[str, float] = {"n_finalists": len(outcome.finalists)}
    if outcome.kendall_tau is not None:
        metrics["proxy_kendall_tau"] = outcome.kendall_tau
    if outcome.winner:
        metrics |= {"finalist_winner_trial": winner, "finalist_val_acc_mean": outcome.winner.mean,
                    "finalist_latency_ms_measured": outcome.winner.measured_ms}  # fmt: skip
    tracker.log_metrics(tracker.parent_run_id, metrics)
    rows = [{**row, "hparams": str(row["hparams"])} for row in outcome.rows()]
    if rows:
        tracker.log_parent_table({k: [row[k] for row in rows] for k in rows[0]}, "finalists.json")
