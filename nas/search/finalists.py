"""The finalist round: the search's best networks, the space's yardsticks and a random sample of the other
trained trials, trained again longer with several seeds, their latency measured, one winner within the budget.

Why: the search's best trial won one short, single-seed run at a latency that may have been predicted. The
maximum of many noisy runs is the luckiest one, and the trial closest under the budget is the one whose
latency was most under-predicted. So every network of the round trains with one recipe and on seeds no
search run used (the lucky run does not count again), each seed shared by all of them (paired); the
verdicts against the references come from a paired test (``nas.search.verdicts``), and the sample of other
trials lets the rank correlation between the two rounds say how far the short runs can be trusted.

Each finalist training run (a network and a seed) is a queued trial of a second Optuna study,
``<study>.finalists``, in the same storage: finished runs are kept across reruns, a killed run's heartbeat
puts it back in the queue, and worker processes share the queue exactly as they share the search.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from nas import trial_states
from nas.data import TensorImageDataModule
from nas.errors import NasError
from nas.interrupts import Interrupted
from nas.latency.measure import LatencySettings, LatencyStats, measure_arch
from nas.objectives import StudyObjective
from nas.search.objective import failure_reason, free_trial_memory
from nas.search.study import worker_index
from nas.search.verdicts import Comparison, Fidelity, Interval, decide, mean_interval, paired_comparison, rank_fidelity
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
HPARAM_RULES = ("best", "own")  # search.finalist_hparams: whose hyperparameters each network of the round gets


@dataclass(frozen=True)
class RoundSettings:
    """``search.finalists`` best trials (0: no round) and ``fidelity_sample`` others, each trained
    ``finalist_seeds`` times for ``finalist_epochs`` (null: three times ``train.epochs``) with the hyperparameters
    that ``finalist_hparams`` names; verdicts at ``verdict_alpha``."""

    count: int
    epochs: int
    seeds: int
    fidelity_sample: int = 0
    hparams: str = "best"
    alpha: float = 0.05

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> RoundSettings:
        s = cfg.search
        epochs = s.get("finalist_epochs")
        values = {
            "finalists": s.get("finalists", 0),
            "finalist_epochs": 3 * int(cfg.train.epochs) if epochs is None else epochs,
            "finalist_seeds": s.get("finalist_seeds", 3),
            "fidelity_sample": s.get("fidelity_sample", 3),
        }
        for key, value in values.items():
            low = 1 if key in ("finalist_epochs", "finalist_seeds") else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise NasError(f"search.{key}={value!r} must be a whole number >= {low}")
        rule, alpha = s.get("finalist_hparams", "best"), s.get("verdict_alpha", 0.05)
        if rule not in HPARAM_RULES:
            raise NasError(f"search.finalist_hparams={rule!r} is not one of {', '.join(HPARAM_RULES)}")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1:
            raise NasError(f"search.verdict_alpha={alpha!r} must be a probability between 0 and 1 (e.g. 0.05)")
        return cls(values["finalists"], values["finalist_epochs"], values["finalist_seeds"],
                   values["fidelity_sample"], rule, float(alpha))  # fmt: skip


@dataclass(frozen=True)
class Candidate:
    """A trained trial of the search that goes to the round: one of the best, a reference, or one of the random
    sample that is there to measure the proxy's fidelity (``sample``: never the winner, no verdicts)."""

    trial: int
    arch: str
    hparams: dict[str, Any]  # what it trains with in the round (search.finalist_hparams)
    reference: str | None
    search_acc: float
    predicted_ms: float
    params: int
    sample: bool = False

    @property
    def name(self) -> str:
        return self.reference or f"trial {self.trial}"


def pick_candidates(study: optuna.Study, goal: StudyObjective, settings: RoundSettings, seed: int) -> list[Candidate]:
    """The ``count`` best feasible trials by the search objective, every trained reference, and
    ``fidelity_sample`` of the other trained trials drawn at random (the same ones on a rerun of the same study)."""
    ranked = goal.ranked(study)
    chosen = ranked[: settings.count] + [t for t in ranked[settings.count :] if t.user_attrs.get("reference")]
    taken = {t.number for t in chosen}
    rest = [t for t in trial_states.complete(study) if t.number not in taken and "val_acc" in t.user_attrs]
    sample = random.Random(seed).sample(rest, min(settings.fidelity_sample, len(rest)))
    keys = set(study.user_attrs.get("identity", {}).get("search.hparams") or {})

    def own(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
        return {k: v for k, v in t.params.items() if k in keys}

    best = own(ranked[0]) if ranked else {}
    mine = settings.hparams == "own"
    return [
        Candidate(
            trial=t.number,
            arch=str(t.user_attrs["arch"]),
            hparams=own(t) if mine and not t.user_attrs.get("reference") else dict(best),
            reference=t.user_attrs.get("reference"),
            search_acc=float(t.user_attrs["val_acc"]),
            predicted_ms=float(t.user_attrs["latency_ms"]),
            params=int(t.user_attrs["params"]),
            sample=t.number not in taken,
        )
        for t in chosen + sorted(sample, key=lambda t: t.number)
    ]


def round_seeds(study: optuna.Study, base: int, count: int) -> list[int]:
    """``count`` seeds after ``base`` that no search trial trained with (complete, pruned or failed alike): the
    round's runs start from other weights and see other batch orders than the runs that got their networks
    selected. Trials from before the seed was recorded trained with the study's ``seed``, ``base``."""
    trials = study.get_trials(deepcopy=False)
    used = {int(t.user_attrs["seed"]) for t in trials if "seed" in t.user_attrs} | {base}
    seeds, candidate = [], base
    while len(seeds) < count:
        candidate += 1
        if candidate not in used:
            seeds.append(candidate)
    return seeds


def recipe_digest(hparams: dict[str, Any]) -> str:
    """Short name of a run's hyperparameters: a run trained with others is another run."""
    return hashlib.blake2b(json.dumps(hparams, sort_keys=True, default=str).encode(), digest_size=4).hexdigest()


def job_key(trial: int, seed: int, epochs: int, hparams: dict[str, Any]) -> str:
    return f"{trial}/{seed}/{epochs}/{recipe_digest(hparams)}"


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
    """One candidate after the round: its accuracy per seed and its measured latency (samples: not measured)."""

    candidate: Candidate
    by_seed: dict[int, float]
    measured_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    over_budget: bool = False
    latency_fallback: str | None = None  # why it was timed eagerly: its CUDA-graph capture failed

    @property
    def accs(self) -> list[float]:
        return [self.by_seed[s] for s in sorted(self.by_seed)]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.by_seed.values())

    @property
    def sd(self) -> float:
        """The seeds' sample standard deviation (0 with one seed: no spread known)."""
        return statistics.stdev(self.by_seed.values()) if len(self.by_seed) > 1 else 0.0

    @property
    def interval(self) -> Interval | None:
        return mean_interval(self.accs)


def verdicts(finalists: list[Finalist], alpha: float) -> dict[int, list[Comparison]]:
    """Each network of the round but the samples against each reference (paired over shared seeds); the
    networks compared with one reference form one family for Holm's correction."""
    references = [f for f in finalists if f.candidate.reference]
    compared = [f for f in finalists if not f.candidate.sample]
    out: dict[int, list[Comparison]] = {f.candidate.trial: [] for f in compared}
    for r in references:
        others = [f for f in compared if f is not r]
        family = [paired_comparison(f.by_seed, r.by_seed, r.candidate.name) for f in others]
        for f, decided in zip(others, decide(family, alpha), strict=True):
            out[f.candidate.trial].append(decided)
    return out


def versus(a: Finalist, b: Finalist, alpha: float) -> Comparison:
    """One paired comparison on its own (the winner against the runner-up)."""
    return decide([paired_comparison(a.by_seed, b.by_seed, b.candidate.name)], alpha)[0]


@dataclass
class RoundOutcome:
    settings: RoundSettings
    finalists: list[Finalist]
    winner: Finalist | None
    fidelity: Fidelity
    failed: list[str]  # finalist runs that did not finish, with their reasons
    latency: LatencySettings
    seeds: list[int] = field(default_factory=list)
    runs: dict[int, str] = field(default_factory=dict)  # candidate trial -> its finalist MLflow run
    unfinished: list[int] = field(default_factory=list)  # candidates without one finished run
    comparisons: dict[int, list[Comparison]] = field(default_factory=dict)  # trial -> against each reference

    @property
    def kendall_tau(self) -> float | None:
        return self.fidelity.kendall_tau

    @property
    def runner_up(self) -> Finalist | None:
        """The best contender after the winner (within the budget), to say whether the win is more than noise."""
        rest = [f for f in contenders(self.finalists) if f is not self.winner and not f.over_budget]
        return max(rest, key=lambda f: (f.mean, -f.candidate.trial)) if rest and self.winner else None

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
        """One row per network of the round: its candidate, its figures and its verdicts."""
        rows = []
        for f in self.finalists:
            interval = f.interval
            rows.append({
                **asdict(f.candidate), "val_acc_mean": f.mean, "val_acc_std": f.sd, "runs": len(f.accs),
                "val_acc_low": interval.low if interval else None, "val_acc_high": interval.high if interval else None,
                "accs_by_seed": {str(s): a for s, a in sorted(f.by_seed.items())},
                "measured_ms": f.measured_ms, "p10_ms": f.p10_ms, "p90_ms": f.p90_ms, "over_budget": f.over_budget,
                "latency_fallback": f.latency_fallback,
                "verdicts": [asdict(c) for c in self.comparisons.get(f.candidate.trial, [])],
            })  # fmt: skip
        return rows

    def record(self, trained: int) -> dict[str, Any]:
        """What the search study keeps (read by ``nas.retrain select=best`` through ``nas.studies``)."""
        return {
            "winner": self.winner.candidate.trial if self.winner else None,
            "no_winner_reason": self.no_winner_reason,
            "trained": trained,
            "kendall_tau": self.kendall_tau,
            "fidelity": self.fidelity.record(),
            "finalists": self.settings.count,
            "fidelity_sample": self.settings.fidelity_sample,
            "epochs": self.settings.epochs,
            "seeds": self.settings.seeds,
            "round_seeds": self.seeds,
            "finalist_hparams": self.settings.hparams,
            "verdict_alpha": self.settings.alpha,
            "candidates": self.rows(),
        }


def fidelity_of(finalists: list[Finalist], seed: int) -> Fidelity:
    """Rank agreement over every network of the round (best, references and the random sample)."""
    return rank_fidelity([f.candidate.search_acc for f in finalists], [f.mean for f in finalists], seed)


def contenders(finalists: list[Finalist]) -> list[Finalist]:
    """The networks that may win: the best trials and the references; the fidelity sample only measures."""
    return [f for f in finalists if not f.candidate.sample]


def pick_winner(finalists: list[Finalist], goal: StudyObjective) -> Finalist | None:
    """The best mean accuracy (by the study's objective, at the measured latency) within the budget."""
    eligible = [f for f in contenders(finalists) if not f.over_budget]
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
    seeds: list[int] = field(default_factory=list)  # the round's, shared by every network (round_seeds)

    def plan(self) -> dict[str, Candidate]:
        """The round's runs for today's candidates and settings: job key -> candidate."""
        return {job_key(c.trial, s, self.settings.epochs, c.hparams): c for c in self.candidates
                for s in self.seeds}  # fmt: skip

    def prepare(self) -> int:
        """Queue every run of the plan not already finished or queued, after dropping queued runs that are no
        longer in it (another finalists/seeds/epochs setting, a study that grew); returns how many are finished."""
        self.candidates = pick_candidates(self.study, self.goal, self.settings, int(self.cfg.seed))
        if not self.candidates:
            return 0
        self.seeds = round_seeds(self.study, int(self.cfg.seed), self.settings.seeds)
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
        attr = self._run_attr(c)
        run_id = self.round_study.user_attrs.get(attr)
        try:
            if run_id is None:
                params = {"arch": c.arch, "finalist_epochs": self.settings.epochs, **c.hparams}
                tags = {"nas.reference": c.reference} if c.reference else {}
                tags |= {"nas.finalist.role": "fidelity_sample" if c.sample else "contender"}
                run_id = self.tracker.start_finalist(c.trial, params, tags)
                self.round_study.set_user_attr(attr, run_id)
            else:
                self.tracker.reopen(run_id)
        except TrackingError as exc:
            print(f"  finalist {c.name}: not recorded in MLflow ({exc})", flush=True)
        return run_id

    def _run_attr(self, c: Candidate) -> str:
        return f"run:{c.trial}@{self.settings.epochs}@{recipe_digest(c.hparams)}"

    def runs(self) -> dict[int, str]:
        """Each candidate's finalist run id (where MLflow could create one)."""
        assert self.round_study is not None
        attrs = self.round_study.user_attrs
        ids = {c.trial: attrs.get(self._run_attr(c)) for c in self.candidates}
        return {trial: run_id for trial, run_id in ids.items() if run_id}

    def describe(self, done: int) -> str:
        best = {t.number for t in self.goal.ranked(self.study)[: self.settings.count]}
        among = [c.reference for c in self.candidates if c.reference and c.trial in best]
        extra = [c.reference for c in self.candidates if c.reference and c.trial not in best]
        who = f"the {len(best)} best trial(s)" + (f", {', '.join(among)} among them" if among else "")
        who += f", and the reference(s) {', '.join(extra)}" if extra else ""  # type: ignore[arg-type]
        sampled = sum(c.sample for c in self.candidates)
        who += f", and {sampled} other trial(s) drawn at random to measure the proxy's fidelity" if sampled else ""
        total = len(self.candidates) * self.settings.seeds
        return (
            f"\nfinalist round: {len(self.candidates)} networks ({who}) x {self.settings.seeds} seed(s) "
            f"({', '.join(map(str, self.seeds))}: none used by a search trial) x {self.settings.epochs} epochs, "
            f"{self.recipe_text()}: {total} runs, {done} already done"
        )

    def recipe_text(self) -> str:
        if not self.study.user_attrs.get("identity", {}).get("search.hparams"):
            return "all with the configured hyperparameters"
        if self.settings.hparams == "own":
            return "each trial with its own hyperparameters, the references with the best trial's"
        best = self.goal.ranked(self.study)[0]
        return f"all with the hyperparameters of trial {best.number}, the search's best"

    def conclude(self) -> RoundOutcome:
        """Collect the runs, measure each finalist's latency, pick the winner, record everything."""
        assert self.round_study is not None
        finalists, failed = self._collect()
        self._measure(contenders(finalists))
        for f in contenders(finalists):
            f.over_budget = self.goal.is_over_budget(f.measured_ms)  # type: ignore[arg-type]
        outcome = RoundOutcome(
            self.settings,
            finalists,
            pick_winner(finalists, self.goal),
            fidelity_of(finalists, int(self.cfg.seed)),
            failed,
            self.latency,
            seeds=list(self.seeds),
            unfinished=[c.trial for c in self.candidates if c.trial not in {f.candidate.trial for f in finalists}],
            comparisons=verdicts(finalists, self.settings.alpha),
        )
        self.study.set_user_attr(ROUND_ATTR, outcome.record(trial_states.count_trained(self.study)))
        with contextlib.suppress(TrackingError):  # the outcome is in the study; the summary says if MLflow failed
            self.tracker.close_orphan_seed_runs()
        return outcome

    def _collect(self) -> tuple[list[Finalist], list[str]]:
        """Each planned run's accuracy; the failures of planned runs that never finished since (the latest
        reason of each), not those a rerun has made good."""
        assert self.round_study is not None
        accs: dict[int, dict[int, float]] = {c.trial: {} for c in self.candidates}
        plan = self.plan()
        finished, failures = set(), {}
        for t in self.round_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
            key = t.user_attrs.get("key")
            if key not in plan:
                continue
            if t.state == TrialState.COMPLETE:
                finished.add(key)
                accs[plan[key].trial][int(t.user_attrs["seed"])] = float(t.user_attrs["val_acc"])
            elif t.user_attrs.get("fail_reason"):
                failures[key] = f"{plan[key].name} seed {t.user_attrs['seed']}: {t.user_attrs['fail_reason']}"
        failed = [reason for key, reason in failures.items() if key not in finished]
        return [Finalist(c, accs[c.trial]) for c in self.candidates if accs[c.trial]], failed

    def _measure(self, finalists: list[Finalist]) -> None:
        """Measured on the target with the study's settings, all contenders together in ``MEASURE_PASSES``
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
                                    "p10_ms": min(s.p10_ms for s in stats), "p90_ms": max(s.p90_ms for s in stats),
                                    "fallback": next((s.fallback for s in stats if s.fallback), None)}
                       for trial, stats in passes.items()}  # fmt: skip
            stored = {"key": key, "trials": trials, "figures": figures}
            self.round_study.set_user_attr(LATENCY_PASS_ATTR, stored)
        for f in finalists:
            figure = stored["figures"][str(f.candidate.trial)]
            f.measured_ms, f.p10_ms, f.p90_ms = figure["median_ms"], figure["p10_ms"], figure["p90_ms"]
            f.latency_fallback = figure.get("fallback")


def log_round(tracker: StudyTracker, outcome: RoundOutcome) -> None:
    """Each finalist's run gets its figures and ends; the study's run gets the table and the proxy's fidelity."""
    winner = outcome.winner.candidate.trial if outcome.winner else None
    for f in outcome.finalists:
        run_id = outcome.runs.get(f.candidate.trial)
        if run_id is None:
            continue
        interval = f.interval
        tracker.log_metrics(run_id, {
            "val_acc_mean": f.mean, "val_acc_std": f.sd, "val_acc_search": f.candidate.search_acc,
            "val_acc_low": interval.low if interval else None, "val_acc_high": interval.high if interval else None,
            "latency_ms_measured": f.measured_ms, "latency_ms_p10": f.p10_ms, "latency_ms_p90": f.p90_ms,
            "latency_ms_predicted": f.candidate.predicted_ms, "seeds_trained": len(f.accs),
        })  # fmt: skip
        tags = {
            "nas.finalist.winner": str(f.candidate.trial == winner).lower(),
            "nas.finalist.over_budget": str(f.over_budget).lower(),
        }
        if f.latency_fallback:
            tags["nas.latency_mode"] = f"eager fallback: {f.latency_fallback}"
        tracker.set_tags(run_id, tags)
        tracker.end_trial(run_id, "complete", "FINISHED")
    for trial in outcome.unfinished:
        if trial in outcome.runs:
            tracker.end_trial(outcome.runs[trial], trial_states.FAILED, "FAILED", "no finalist run finished")
    if not tracker.parent_run_id:
        return
    fid = outcome.fidelity
    metrics: dict[str, float | None] = {"n_finalists": len(outcome.finalists), "proxy_networks": fid.networks}
    for name, value, interval in (("kendall_tau", fid.kendall_tau, fid.kendall_interval),
                                  ("spearman", fid.spearman, fid.spearman_interval)):  # fmt: skip
        metrics[f"proxy_{name}"] = value
        metrics[f"proxy_{name}_low"] = interval.low if interval else None
        metrics[f"proxy_{name}_high"] = interval.high if interval else None
    if outcome.winner:
        metrics |= {"finalist_winner_trial": winner, "finalist_val_acc_mean": outcome.winner.mean,
                    "finalist_latency_ms_measured": outcome.winner.measured_ms}  # fmt: skip
    tracker.log_metrics(tracker.parent_run_id, metrics)  # type: ignore[arg-type]
    rows = [{**row, "hparams": str(row["hparams"]), "accs_by_seed": json.dumps(row["accs_by_seed"]),
             "verdicts": json.dumps(row["verdicts"])} for row in outcome.rows()]  # fmt: skip
    if rows:  # a plain MLflow table (mlflow.load_table reads it); the round's own figures go beside it
        tracker.log_parent_table({k: [row[k] for row in rows] for k in rows[0]}, "finalists.json")
        round_figures = {
            "fidelity": fid.record(),
            "round_seeds": outcome.seeds,
            "winner": winner,
            "verdict_alpha": outcome.settings.alpha,
            "finalist_hparams": outcome.settings.hparams,
        }
        tracker.log_parent_dict(round_figures, "finalist_round.json")
