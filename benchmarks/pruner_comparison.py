"""Which pruner should a search use by default? The same seeded study run with each, on real images.

    python benchmarks/pruner_comparison.py --trials 20 data=imagefolder data.root=/path/to/cifar10-subset \
        train.epochs=4 search.startup_trials=5

For each pruner (``none``, ``median``, ``hyperband``; each behind the search's evidence rule) runs
``python -m nas.search`` in a scratch folder with the same seed, then reports wall time, epochs
trained, networks pruned and the best and top-3 validation accuracy of the networks trained to the
end. A single short study per pruner is noisy, so the ``none`` study's full learning curves are also
replayed through each pruner's decisions (same trials, same order): the epochs it would have saved
and which of the finally-best networks it would have stopped. Writes
benchmarks/results/pruner_comparison-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from bench_output import device_name, write_results
from hydra import compose, initialize_config_dir
from optuna.trial import TrialState

from nas import trial_states
from nas.cli import CONF_DIR
from nas.objectives import make_objective
from nas.search.study import make_pruner

PRUNERS = ("none", "median", "hyperband")


def run(folder: Path, pruner: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "nas.search", f"+space={args.space}", f"trials={args.trials}", f"study.name={pruner}",
           f"search/pruner={pruner}", f"seed={args.seed}", "search.enqueue_references=false", "search.plots=false",
           "latency.repeats=5", *overrides]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=folder, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    study = optuna.load_study(study_name=pruner, storage=f"sqlite:///{folder}/outputs/optuna.db")
    trained = trial_states.trained(study)
    complete = sorted((t.user_attrs["val_acc"] for t in trial_states.complete(study)), reverse=True)
    return {
        "wall_s": wall,
        "trained": len(trained),
        "pruned": sum(t.state == TrialState.PRUNED for t in trained),
        "epochs_trained": sum(len(t.intermediate_values) for t in trained),
        "best_val_acc": complete[0] if complete else None,
        "top3_mean_val_acc": sum(complete[:3]) / len(complete[:3]) if complete else None,
        "curves": [list(t.intermediate_values.values()) for t in sorted(trained, key=lambda t: t.number)],
    }


def replay(curves: list[list[float]], pruner: str, overrides: list[str]) -> dict:
    """The decisions ``pruner`` would take on these full learning curves, in the same order."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"search/pruner={pruner}", *overrides])
    study = optuna.create_study(direction="maximize", pruner=make_pruner(cfg, make_objective("accuracy", None)))
    kept = []
    for curve in curves:
        trial = study.ask()
        for epoch, acc in enumerate(curve):
            trial.report(acc, epoch)
            if epoch + 1 < len(curve) and trial.should_prune():
                study.tell(trial, state=TrialState.PRUNED)
                kept.append(epoch + 1)
                break
        else:
            study.tell(trial, curve[-1])
            kept.append(len(curve))
    finals = [c[-1] for c in curves]
    top3 = sorted(range(len(curves)), key=lambda i: -finals[i])[:3]
    return {
        "epochs_fraction": sum(kept) / sum(len(c) for c in curves),
        "pruned": sum(k < len(c) for k, c in zip(kept, curves, strict=True)),
        "top3_pruned": sum(kept[i] < len(curves[i]) for i in top3),
        "best_kept": kept[top3[0]] == len(curves[top3[0]]),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="mbv3_small")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args, overrides = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {p: run(Path(tmp), p, overrides) for p in PRUNERS}
    search_overrides = [o for o in overrides if o.startswith(("search.", "train.epochs"))]
    replays = {p: replay(runs["none"]["curves"], p, search_overrides) for p in PRUNERS[1:]}
    result = {
        "device": device_name(),
        "cpus": os.cpu_count(),
        "space": args.space,
        "trials": args.trials,
        "seed": args.seed,
        "overrides": overrides,
        "runs": runs,
        "replay_on_unpruned_curves": replays,
    }
    lines = [
        f"# Pruners on {result['device']} ({result['cpus']} CPUs), {args.space}, {args.trials} trained networks each",
        "",
        f"`python benchmarks/pruner_comparison.py {' '.join(sys.argv[1:])}`",
        "",
        "| pruner | wall s | epochs trained | pruned | best val_acc | top-3 mean val_acc |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        best = "-" if r["best_val_acc"] is None else f"{r['best_val_acc']:.4f}"
        top3 = "-" if r["top3_mean_val_acc"] is None else f"{r['top3_mean_val_acc']:.4f}"
        lines.append(f"| {name} | {r['wall_s']:.0f} | {r['epochs_trained']} | {r['pruned']} | {best} | {top3} |")
    lines += [
        "",
        "Replayed on the `none` study's full curves (same networks, same order):",
        "",
        "| pruner | epochs kept | networks pruned | of the final top 3, pruned | final best kept |",
        "|---|---|---|---|---|",
    ]
    for name, r in replays.items():
        kept = "yes" if r["best_kept"] else "no"
        lines.append(f"| {name} | {r['epochs_fraction']:.0%} | {r['pruned']} | {r['top3_pruned']} | {kept} |")
    write_results("pruner_comparison", result, "\n".join(lines))
