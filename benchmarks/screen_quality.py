"""Does refusing draws inside the sampler (search.draws_per_trial) cost search quality? Paired over seeds.

    python benchmarks/screen_quality.py                      # 10 seeds, 40 networks each, budget at the 2nd pct
    python benchmarks/screen_quality.py --seeds 3 --trained 20

For each seed, two searches with the project's sampler (conf/search/sampler, seeded as the search seeds
it) over the real space, its hyperparameters and its latency table, at a budget at a low percentile of
the space's latencies, each until ``--trained`` networks within the budget are "trained":

- ``every draw a trial``: ``search.draws_per_trial=1``: a draw over the budget is a trial with its
  constraint, as the search recorded it before the screen;
- ``screen``: the default, the draws over the budget refused inside the sampler (``BudgetScreen``).

Training is replaced by a fixed proxy of accuracy (it grows with log FLOPs and with SE and h-swish
blocks, peaks at a learning rate of 0.1, plus seeded noise), so many seeds are affordable and both paths
see the same landscape; what is compared is the sampler's use of the budget, not a network's real
accuracy. Reported: the best proxy after every 10 networks (mean over seeds and the paired difference
with a 95% t interval and a Wilcoxon signed-rank p), the draws per trained network over the search
(learning the feasible region means it falls), and the sampler's seconds. Writes
benchmarks/results/screen_quality-<space>-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from bench_output import device_name, write_results
from hydra import compose, initialize_config_dir
from scipy import stats

from nas.cli import CONF_DIR
from nas.latency.estimator import make_estimator
from nas.models import cost
from nas.search.hparams import resolve_hparams, sample_hparams
from nas.search.screen import BudgetScreen
from nas.search.study import make_sampler
from nas.space import Arch, load_space

PATHS = ("every draw a trial", "screen")


def proxy_accuracy(arch: Arch, lr: float, rng: np.random.Generator) -> float:
    """Capacity helps with diminishing returns, SE and h-swish help a little, the learning rate has an optimum."""
    flops = cost(arch, 10).flops
    se = sum(b.se for b in arch.blocks) / len(arch.blocks)
    hswish = sum(b.activation == "hswish" for b in arch.blocks) / len(arch.blocks)
    return (
        0.5
        + 0.04 * math.log(flops / 1e6)
        + 0.02 * se
        + 0.01 * hswish
        - 0.02 * math.log10(lr / 0.1) ** 2
        + float(rng.normal(0, 0.003))
    )


class Search:
    """One search of ``trained`` networks within the budget; every trial records what the search's objective
    does (the constraint; 0.0 for a draw over the budget)."""

    def __init__(self, args: argparse.Namespace, cfg: Any, estimator: Any, budget: float, seed: int, screen: bool):
        self.space, self.hparams = load_space(args.space), resolve_hparams(cfg.search.hparams, cfg)
        self.estimator, self.budget, self.rng = estimator, budget, np.random.default_rng(seed)
        self.study = optuna.create_study(direction="maximize", sampler=make_sampler(cfg))
        self.screen = None
        if screen:
            self.screen = BudgetScreen(self.study.sampler, self.draw_arch, self.judge, lambda ms: ms > budget,
                                       int(cfg.search.draws_per_trial), seed=seed,
                                       steady=int(cfg.search.startup_trials))  # fmt: skip
            self.study.sampler = self.screen
        self.draws, self.trained_at_draw, self.best = 0, [], []

    def draw_arch(self, source: Any) -> Arch:
        arch = self.space.sample(source)
        sample_hparams(source, self.hparams)
        return arch

    def judge(self, arch: Arch) -> tuple[float, dict]:
        return self.estimator.latency_ms(arch), {}

    def objective(self, trial: optuna.Trial) -> float:
        arch = self.space.sample(trial)
        hp = sample_hparams(trial, self.hparams)
        draft = self.screen.take(trial.number) if self.screen else None
        latency = draft.latency_ms if draft else self.estimator.latency_ms(arch)
        self.draws += 1 + (draft.refused.count if draft else 0)
        trial.set_constraint("latency_ms_over_budget", latency - self.budget)
        if latency > self.budget:
            return 0.0
        acc = proxy_accuracy(arch, hp["train.optimizer.lr"], self.rng)
        self.best.append(max(acc, self.best[-1]) if self.best else acc)
        self.trained_at_draw.append(self.draws)
        return acc

    def run(self, trained: int, max_draws: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        while len(self.best) < trained and self.draws < max_draws:
            self.study.optimize(self.objective, n_trials=1)
        return {"best": self.best, "trained_at_draw": self.trained_at_draw, "draws": self.draws,
                "trials": len(self.study.trials), "seconds": time.perf_counter() - t0}  # fmt: skip


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    d = np.asarray(b) - np.asarray(a)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    p = float(stats.wilcoxon(d).pvalue) if len(d) > 1 and np.any(d != 0) else 1.0
    return {"mean_diff": float(d.mean()), "low": float(d.mean() - half), "high": float(d.mean() + half), "p": p}


def report(result: dict[str, Any]) -> str:
    runs, checkpoints = result["runs"], result["checkpoints"]
    lines = [
        f"# Search quality with and without the budget screen ({result['space']}, {result['device']})",
        "",
        f"{result['seeds']} seeds x 2 paths, {result['trained']} networks within a {result['budget_ms']:.3f} ms "
        f"budget (percentile {result['percentile']:g} of the space's predicted latencies), sampler "
        f"`{result['sampler']}`, `search.draws_per_trial={result['draws_per_trial']}` for the screen. Accuracy is "
        "a fixed proxy (log FLOPs, SE, h-swish, learning rate; see the script), not trained networks.",
        "",
        "| networks | best proxy: every draw a trial | best proxy: screen | screen - every draw a trial "
        "[95% interval] | Wilcoxon p |",
        "|---|---|---|---|---|",
    ]
    for k in checkpoints:
        a = [r[PATHS[0]]["best"][k - 1] for r in runs]
        b = [r[PATHS[1]]["best"][k - 1] for r in runs]
        c = paired(a, b)
        lines.append(f"| {k} | {np.mean(a):.4f} | {np.mean(b):.4f} | {c['mean_diff']:+.4f} [{c['low']:+.4f}, "
                     f"{c['high']:+.4f}] | {c['p']:.2f} |")  # fmt: skip
    lines += ["", "Draws per network within the budget (mean over seeds), by tenth of the search; and the totals:", ""]
    lines.append("| path | " + " | ".join(f"{i + 1}/10" for i in range(10)) + " | draws | trials | seconds |")
    lines.append("|---" * 14 + "|")
    for path in PATHS:
        shares = np.mean([tenths(r[path]["trained_at_draw"]) for r in runs], axis=0)
        totals = [np.mean([r[path][key] for r in runs]) for key in ("draws", "trials", "seconds")]
        lines.append(f"| {path} | " + " | ".join(f"{s:.1f}" for s in shares)
                     + f" | {totals[0]:.0f} | {totals[1]:.0f} | {totals[2]:.0f} |")  # fmt: skip
    lines += ["", f"Command: `{result['command']}`; {result['wall_s'] / 60:.0f} min."]
    return "\n".join(lines)


def tenths(trained_at_draw: list[int]) -> list[float]:
    """Draws per trained network in each tenth of the networks (the first tenth includes the random start)."""
    marks = [0, *trained_at_draw]
    n = len(trained_at_draw)
    out = []
    for i in range(10):
        lo, hi = i * n // 10, (i + 1) * n // 10
        out.append((marks[hi] - marks[lo]) / max(1, hi - lo))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="mbv3")
    parser.add_argument("--sampler", default="tpe")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--trained", type=int, default=40)
    parser.add_argument("--percentile", type=float, default=2.0)
    parser.add_argument("--max-draws", type=int, default=20000)
    args = parser.parse_args()
    t0 = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    overrides = [f"+space={args.space}", f"search/sampler={args.sampler}", "latency.device=cpu",
                 "latency.estimator=table", "data=digits"]  # fmt: skip
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    space = load_space(args.space)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "nas.latency", "build-table", *overrides], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        cfg.latency.table_dir = str(Path(tmp) / "outputs" / "latency")
        estimator = make_estimator(cfg.latency, 10, space, 0)
        latencies = [estimator.latency_ms(space.sample(seed)) for seed in range(2000)]
        budget = float(np.percentile(latencies, args.percentile))
        for seed in range(args.seeds):
            cfg.seed = seed
            pair = {path: Search(args, cfg, estimator, budget, seed, path == "screen") for path in PATHS}
            runs.append({path: search.run(args.trained, args.max_draws) for path, search in pair.items()})
            said = [
                f"{p}: best {r['best'][-1]:.4f}, {r['draws']} draws, {r['seconds']:.0f} s" for p, r in runs[-1].items()
            ]
            print(f"seed {seed}: " + "; ".join(said), flush=True)
    complete = [r for r in runs if all(len(r[p]["best"]) == args.trained for p in PATHS)]
    result = {
        "space": args.space, "device": device_name(), "sampler": args.sampler, "seeds": len(complete),
        "trained": args.trained, "percentile": args.percentile, "budget_ms": budget,
        "draws_per_trial": int(cfg.search.draws_per_trial), "runs": complete,
        "checkpoints": sorted({*range(10, args.trained + 1, 10), args.trained}),
        "wall_s": time.perf_counter() - t0, "command": "python benchmarks/screen_quality.py " + " ".join(sys.argv[1:]),
    }  # fmt: skip
    write_results(f"screen_quality-{args.space}", result, report(result))


if __name__ == "__main__":
    main()
