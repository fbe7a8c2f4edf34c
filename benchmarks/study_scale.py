"""Seconds per draw of the search loop as a study grows to 20,000 draws, and where they go.

    python benchmarks/study_scale.py                                  # both paths, the default grid
    python benchmarks/study_scale.py --paths after --samplers tpe --sizes 100 1000 --workers 1
    python benchmarks/study_scale.py --from-results                   # re-summarise the last figures

Every draw is over the budget (``latency.budget_ms`` below the space's cheapest network, with
``search.precheck_budget=false``), so nothing trains and what is timed is the loop itself: ask, the
space's suggestions, the latency prediction (``latency.estimator=table``, the table built once in the
scratch folder), the parameter count, tell, the counting and the tracking; the search stops after
``search.max_draws_over_budget`` draws in a row. Two paths of the same code:

- ``before``: ``search.draws_per_trial=1``, every draw a trial (the loop before the screen). A study at
  N draws holds N trials: it is made by one real draw, then N-1 trials added as that loop records them
  (random architectures and hyperparameters, their predicted latency and constraint; the parameter count
  left at -1, since building 20,000 networks to count it takes 20 minutes and no later draw reads it), then
  ``--probe`` more draws through the real search; the cost per draw is their spacing.
- ``after``: the default (``search.draws_per_trial``: draws over the budget refused inside the sampler,
  one in that many kept as a trial); one real study from empty to the largest size, the cost per draw at
  N from the trials whose draws cover N.

One worker runs in this process's child with timers around the sampler, the storage, the prediction,
the parameter count, the counting and the tracking (exclusive: a storage read inside the sampler counts
as storage); two workers are ``search.workers=2`` of the real command, timed from the trials' start
times in the storage. SQLite always; PostgreSQL too where ``NAS_TEST_POSTGRES_URL`` is set. Writes
benchmarks/results/study_scale-<space>-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from bench_output import RESULTS, device_name, write_results

STEPS = ("sampler", "screen", "storage", "prediction", "parameter count", "counting", "tracking")
BENCH = "study_scale"


# -- the instrumented child: one worker in this process -------------------------------------------------------
class StepTimers:
    """Exclusive wall time per step: time inside a nested timed call goes to the nested step only. The main
    thread's calls only (Optuna's heartbeat thread writes to the storage beside the loop)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []  # [start, time spent in nested timed calls]

    def wrap(self, step: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not threading.main_thread():
                return fn(*args, **kwargs)
            frame = [time.perf_counter(), 0.0]
            self._stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
                elapsed = time.perf_counter() - frame[0]
                self.totals[step] += elapsed - frame[1]
                if self._stack:
                    self._stack[-1][1] += elapsed

        return timed

    def patch(self, owner: Any, names: list[str], step: str) -> None:
        for name in names:
            setattr(owner, name, self.wrap(step, getattr(owner, name)))


def public_methods(cls: type) -> list[str]:
    return [n for n, v in vars(cls).items() if callable(v) and not n.startswith("_")]


def instrument(timers: StepTimers, timeline: list[dict[str, Any]]) -> None:
    """Timers around every step of the loop, and one timeline entry per trial (its start, its draws)."""
    from nas import trial_states
    from nas.search import objective as objective_module
    from nas.search import runner, screen
    from nas.tracking.trials import StudyTracker

    sampler_methods = ["infer_relative_search_space", "sample_relative", "sample_independent",
                       "before_trial", "after_trial"]  # fmt: skip
    for cls in (optuna.samplers.TPESampler, optuna.samplers.RandomSampler, optuna.samplers.GPSampler,
                optuna.samplers.NSGAIISampler):  # fmt: skip
        timers.patch(cls, [n for n in sampler_methods if n in vars(cls)], "sampler")
    timers.patch(screen.BudgetScreen, ["infer_relative_search_space"], "screen")
    timers.patch(optuna.storages._CachedStorage, public_methods(optuna.storages._CachedStorage), "storage")
    timers.patch(optuna.storages.InMemoryStorage, public_methods(optuna.storages.InMemoryStorage), "storage")
    timers.patch(objective_module.Objective, ["judge"], "prediction")
    timers.patch(objective_module, ["arch_params", "cost"], "parameter count")
    timers.patch(objective_module, ["is_surplus"], "counting")
    timers.patch(trial_states, ["count_trained", "counts", "over_budget", "refusals", "trained"], "counting")
    timers.patch(runner, ["_sweep_stale"], "counting")
    timers.patch(StudyTracker, public_methods(StudyTracker), "tracking")
    call = objective_module.Objective.__call__

    def timed_call(self: Any, trial: optuna.Trial) -> Any:
        entry = {"t": time.perf_counter(), "steps": dict(timers.totals), "draws": 1}
        timeline.append(entry)
        try:
            return call(self, trial)
        finally:
            entry["draws"] = 1 + self.outcomes[-1].refused.count if self.outcomes else 1
            entry["end"], entry["end_steps"] = time.perf_counter(), dict(timers.totals)

    objective_module.Objective.__call__ = timed_call


def child(out: Path, overrides: list[str]) -> None:
    """``--child OUT -- OVERRIDES``: run the search here, instrumented, and write the timeline to OUT."""
    from hydra import compose, initialize_config_dir

    from nas.cli import CONF_DIR, quiet_libraries

    quiet_libraries()
    from nas.search.runner import run_search

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    timers, timeline = StepTimers(), []
    instrument(timers, timeline)
    with contextlib.redirect_stdout(sys.stderr):
        run_search(cfg)
    out.write_text(json.dumps(timeline))


# -- studies and their timing ------------------------------------------------------------------------------------
def search_overrides(args: argparse.Namespace, name: str, storage: str) -> list[str]:
    """The search every configuration runs: every draw over the budget, nothing else in the loop."""
    return [
        f"+space={args.space}", "trials=1", f"study.name={name}", f"study.storage={storage}", "data=digits",
        "latency.device=cpu", "latency.estimator=table", f"latency.budget_ms={args.budget_ms}",
        "search.precheck_budget=false", "search.enqueue_references=false", "search.plots=false",
        "search.finalists=0",
    ]  # fmt: skip


def run_child(work: Path, overrides: list[str]) -> list[dict[str, Any]]:
    out = work / "timeline.json"
    command = [sys.executable, __file__, "--child", str(out), "--", *overrides]
    with (work / "search.log").open("a") as log:
        subprocess.run(command, cwd=work, check=False, stdout=log, stderr=subprocess.STDOUT)
    if not out.exists():
        raise SystemExit(f"the search did not run: see {work / 'search.log'}")
    timeline = json.loads(out.read_text())
    out.unlink()
    return timeline


def run_cli(work: Path, overrides: list[str]) -> float:
    t0 = time.perf_counter()
    with (work / "search.log").open("a") as log:
        subprocess.run([sys.executable, "-m", "nas.search", *overrides], cwd=work, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def random_trials(args: argparse.Namespace, work: Path, count: int, seed: int) -> list[optuna.trial.FrozenTrial]:
    """Trials as ``search.draws_per_trial=1`` records a draw over the budget (the objective's attributes)."""
    from hydra import compose, initialize_config_dir

    from nas.cli import CONF_DIR
    from nas.latency.estimator import make_estimator
    from nas.search.hparams import resolve_hparams, sample_hparams
    from nas.search.screen import DraftTrial
    from nas.space import load_space

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=search_overrides(args, "x", "sqlite://"))
    space, hparams = load_space(args.space), resolve_hparams(cfg.search.hparams, cfg)
    cwd = Path.cwd()
    os.chdir(work)  # the table in the scratch folder's outputs/latency
    try:
        estimator = make_estimator(cfg.latency, 10, space, 0)
    finally:
        os.chdir(cwd)
    sampler = optuna.samplers.RandomSampler(seed=seed)
    trials = []
    for _ in range(count):
        source = DraftTrial(lambda name, dist: sampler.sample_independent(None, None, name, dist))  # type: ignore[arg-type]
        arch = space.sample(source)
        sample_hparams(source, hparams)
        latency = estimator.latency_ms(arch)
        trials.append(
            optuna.trial.create_trial(
                params=source.params, distributions=source.distributions, value=0.0,
                user_attrs={"arch": arch.encode(), "latency_ms": latency, "params": -1, "state": "infeasible"},
                system_attrs={"constraints:latency_ms_over_budget": latency - args.budget_ms},
            )
        )  # fmt: skip
    return trials


def at_size(timeline: list[dict[str, Any]], size: int, window: int) -> dict[str, Any] | None:
    """Cost per draw of the trials whose draws lie within [size - window, size + window] (by draws so far),
    and the steps' share of it."""
    done, rows = 0, []
    # A trial's draws: from its start to the next one's (ask, tell and the loop included); the last one to its
    # own end (the search's summary after it is not a draw's).
    ends = [{"t": e["end"], "steps": e["end_steps"]} for e in timeline[-1:] if "end" in e]
    for a, b in itertools.pairwise([*timeline, *ends]):
        first, done = done + 1, done + a["draws"]
        if done >= size - window and first <= size + window:
            rows.append((a, b))
    if not rows:
        return None
    draws = sum(a["draws"] for a, _ in rows)
    wall = sum(b["t"] - a["t"] for a, b in rows)
    steps = {s: sum(b["steps"].get(s, 0.0) - a["steps"].get(s, 0.0) for a, b in rows) / draws for s in STEPS}
    steps["rest of the loop (ask, suggest, tell)"] = wall / draws - sum(steps.values())
    return {"size": size, "draws_timed": draws, "trials_timed": len(rows), "ms_per_draw": 1000 * wall / draws,
            "steps_ms": {k: 1000 * v for k, v in steps.items()}}  # fmt: skip


def drawn(trial: optuna.trial.FrozenTrial) -> int:
    """The draws a trial stands for: itself and those the screen refused before it."""
    return 1 + int((trial.user_attrs.get("refused_draws") or {}).get("count", 0))


def storage_timing(
    storage: str, name: str, size: int, window: int, workers: int, first: int = 0
) -> dict[str, Any] | None:
    """Several workers: the study's own clock (each trial's start, from trial ``first`` on, ``size`` counted from
    there); a worker's milliseconds per draw are the study's times the workers."""
    study = optuna.load_study(study_name=name, storage=storage)
    trials = sorted((t for t in study.get_trials(deepcopy=False) if t.number >= first), key=lambda t: t.datetime_start)
    timeline = [{"t": t.datetime_start.timestamp(), "steps": {}, "draws": drawn(t), "end_steps": {},
                 "end": (t.datetime_complete or t.datetime_start).timestamp()} for t in trials]  # fmt: skip
    got = at_size(timeline, size, window)
    if got:
        got.pop("steps_ms")
        got["ms_per_draw"] *= workers
    return got


# -- one configuration -----------------------------------------------------------------------------------------
def storage_url(kind: str, work: Path) -> str:
    return f"sqlite:///{work}/outputs/optuna.db" if kind == "sqlite" else os.environ["NAS_TEST_POSTGRES_URL"]


def window(size: int) -> int:
    return max(20, size // 20)


def prefilled(args: argparse.Namespace, work: Path, size: int, storage: str, name: str) -> None:
    """Study ``name`` holding ``size`` draws as the old loop leaves them: one real draw (the study, its identity
    and MLflow run), then ``size - 1`` trials added."""
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=name, storage=storage)
    run_cli(
        work, [*search_overrides(args, name, storage), "search.draws_per_trial=1", "search.max_draws_over_budget=1"]
    )
    optuna.load_study(study_name=name, storage=storage).add_trials(random_trials(args, work, size - 1, seed=size))


def before(args: argparse.Namespace, work: Path, sampler: str, kind: str, workers: int, size: int) -> dict | None:
    """A study made to hold ``size`` draws as the old loop leaves them, then ``--probe`` real draws (per worker).
    SQLite: made once per size and copied for every probe (a study does not depend on its sampler)."""
    name = f"before-{size}"
    if kind == "sqlite":
        made = work / f"prefill-{size}.db"
        if not made.exists():
            prefilled(args, work, size, f"sqlite:///{made}", name)
        shutil.copyfile(made, work / "probe.db")
        storage = f"sqlite:///{work / 'probe.db'}"
    else:
        storage = storage_url(kind, work)
        prefilled(args, work, size, storage, name)
    probe = [*search_overrides(args, name, storage), f"search/sampler={sampler}", "search.draws_per_trial=1",
             f"search.max_draws_over_budget={args.probe}"]  # fmt: skip
    middle = args.probe * workers // 2  # the probe's draws, counted from its first
    if workers == 1:
        got = at_size(run_child(work, probe), middle, middle)
    else:
        run_cli(work, [*probe, f"search.workers={workers}"])
        got = storage_timing(storage, name, middle, middle, workers, first=size)
    if got:
        got["size"] = size
    return got


def after(args: argparse.Namespace, work: Path, sampler: str, kind: str, workers: int) -> list[dict]:
    """One real study from empty to the largest size: the cost per draw at each size on the way."""
    storage = storage_url(kind, work)
    name = f"after-{sampler}-{kind}-w{workers}"
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=name, storage=storage)
    sizes = [n for n in args.sizes if n <= args.after_limit.get(sampler, max(args.sizes))]
    largest = max(sizes)
    streak = largest // workers  # each worker stops after its own streak of draws
    base = [*search_overrides(args, name, storage), f"search/sampler={sampler}",
            f"search.draws_per_trial={args.draws_per_trial}", f"search.max_draws_over_budget={streak}"]  # fmt: skip
    t0 = time.perf_counter()
    if workers == 1:
        timeline = run_child(work, base)
        rows = [at_size(timeline, size, window(size)) for size in sizes]
    else:
        run_cli(work, [*base, f"search.workers={workers}"])
        rows = [storage_timing(storage, name, size, window(size), workers) for size in sizes]
    wall = time.perf_counter() - t0
    study = optuna.load_study(study_name=name, storage=storage)
    for row in rows:
        if row:
            row["study_trials"], row["study_wall_s"] = len(study.trials), wall
    return [r for r in rows if r]


# -- the report --------------------------------------------------------------------------------------------------
def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| path | sampler | storage | workers | draws in the study | ms per draw | x the draw at the smallest size |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["path"], r["sampler"], r["storage"], r["workers"])].append(r)
    for key, rows in groups.items():
        rows.sort(key=lambda r: r["size"])
        first = rows[0]["ms_per_draw"]
        for r in rows:
            path, sampler, storage, workers = key
            ratio = r["ms_per_draw"] / first
            lines.append(f"| {path} | {sampler} | {storage} | {workers} | {r['size']:,} | {r['ms_per_draw']:.1f} | "
                         f"{ratio:.2f} |")  # fmt: skip
    return "\n".join(lines)


def breakdown(results: list[dict[str, Any]]) -> str:
    steps = [*STEPS, "rest of the loop (ask, suggest, tell)"]
    lines = ["| path | sampler | storage | draws | " + " | ".join(steps) + " |", "|---" * (4 + len(steps)) + "|"]
    for r in results:
        if r["workers"] == 1 and r.get("steps_ms"):
            cells = " | ".join(f"{r['steps_ms'][s]:.1f}" for s in steps)
            lines.append(f"| {r['path']} | {r['sampler']} | {r['storage']} | {r['size']:,} | {cells} |")
    return "\n".join(lines)


def report(result: dict[str, Any]) -> str:
    results = result["results"]
    return "\n".join(
        [
            f"# The search loop's cost per draw as the study grows ({result['space']}, {result['device']})",
            "",
            f"Every draw over a {result['budget_ms']} ms budget (below the space's cheapest network): nothing trains. "
            f"`before` = `search.draws_per_trial=1` (every draw a trial; studies built to each size, then "
            f"{result['probe']} real draws timed); `after` = the default `search.draws_per_trial="
            f"{result['draws_per_trial']}` (one real study from empty to {max(result['sizes']):,} draws). "
            "Two workers: draws per second of the study, times two. Skipped: " + (result.get("skipped") or "nothing"),
            "",
            table(results),
            "",
            "Where a draw's milliseconds go (one worker; exclusive: the storage reads inside the sampler count as "
            "storage; `screen` is the drafting around the sampler):",
            "",
            breakdown(results),
            "",
            f"Command: `{result['command']}`; {result['wall_s'] / 60:.0f} min.",
        ]
    )


def results_path(args: argparse.Namespace) -> Path:
    return RESULTS / f"{BENCH}-{args.space}-{device_name().replace(' ', '_').lower()}.json"


def main(args: argparse.Namespace) -> None:
    if args.from_results:
        result = json.loads(results_path(args).read_text())
        write_results(f"{BENCH}-{args.space}", result, report(result))
        return
    t0 = time.perf_counter()
    storages = [k for k in args.storages if k == "sqlite" or os.environ.get("NAS_TEST_POSTGRES_URL")]
    results, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-m", "nas.latency", "build-table", f"+space={args.space}", "data=digits",
                        "latency.device=cpu"], cwd=work, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        for sampler in args.samplers:
            for kind in storages:
                for workers in args.workers:
                    if "after" in args.paths:
                        for row in after(args, work, sampler, kind, workers):
                            results.append({"path": "after", "sampler": sampler, "storage": kind, "workers": workers,
                                            **row})  # fmt: skip
                            print(json.dumps(results[-1]), flush=True)
                    if "before" not in args.paths:
                        continue
                    for size in args.sizes:
                        if size > args.before_limit.get(sampler, max(args.sizes)):
                            skipped.append(f"before/{sampler} at {size:,} (over --before-limit)")
                            continue
                        row = before(args, work, sampler, kind, workers, size)
                        if row:
                            results.append({"path": "before", "sampler": sampler, "storage": kind,
                                            "workers": workers, **row})  # fmt: skip
                            print(json.dumps(results[-1]), flush=True)
    if args.append:
        old = json.loads(results_path(args).read_text())
        results, skipped = old["results"] + results, [old["skipped"], *skipped] if old["skipped"] else skipped
        t0 -= old["wall_s"]
        command = old["command"] + "; then " + " ".join(sys.argv[1:])
    else:
        command = "python benchmarks/study_scale.py " + " ".join(sys.argv[1:])
    result = {
        "space": args.space, "device": device_name(), "budget_ms": args.budget_ms, "probe": args.probe,
        "draws_per_trial": args.draws_per_trial, "sizes": args.sizes, "results": results,
        "skipped": "; ".join(skipped), "wall_s": time.perf_counter() - t0,
        "command": command,
    }  # fmt: skip
    write_results(f"{BENCH}-{args.space}", result, report(result))


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="mbv3")
    parser.add_argument("--paths", nargs="+", default=["before", "after"], choices=["before", "after"])
    parser.add_argument("--samplers", nargs="+", default=["tpe", "random", "nsga2", "gp"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[100, 1000, 5000, 20000])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--probe", type=int, default=8, help="draws timed at each size (before)")
    parser.add_argument("--budget-ms", type=float, default=0.001, help="below the cheapest network: nothing trains")
    parser.add_argument("--draws-per-trial", type=int, default=100, help="what the after path runs with (default)")
    limit = "largest size per sampler for the before path, JSON (a GP fit is cubic in trials)"
    parser.add_argument("--before-limit", type=json.loads, default={"gp": 1000}, help=limit)
    parser.add_argument("--after-limit", type=json.loads, default={"gp": 1000}, help="the same for the after path")
    parser.add_argument("--storages", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"],
                        help="postgresql only where NAS_TEST_POSTGRES_URL is set")  # fmt: skip
    parser.add_argument("--append", action="store_true", help="add to the figures already in results/")
    parser.add_argument("--from-results", action="store_true")
    return parser.parse_args()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), sys.argv[4:] if sys.argv[3:4] == ["--"] else sys.argv[3:])
    else:
        main(parse())
