"""Trials per hour of the same short search with 1 worker and with k workers (or k trials per GPU).

    python benchmarks/search_throughput.py --workers 2 --trials 8 data=digits train.epochs=1
    python benchmarks/search_throughput.py --per-gpu 4 --cuda-graph --trials 40 data=imagefolder data.root=...

Runs ``python -m nas.search`` in a scratch folder (fresh studies, table latency so that concurrent
workers never measure): one trial at a time, then k at once (``--workers`` or ``--per-gpu``), and with
``--cuda-graph`` one at a time with the training step captured. Prints trials/hour for each, their
ratio to the first and the per-trial fixed cost (trial wall time minus time spent in epochs), and
writes benchmarks/results/search_throughput-<device>.json and .md after each run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch
from bench_output import device_name, write_results


def run(folder: Path, name: str, trials: int, extra: list[str], overrides: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "nas.search",
        f"+space={args.space}",
        f"trials={trials}",
        f"study.name={name}",
        "latency.estimator=table",
        "search.enqueue_references=false",
        *extra,
        *overrides,
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=folder, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder}/outputs/optuna.db")
    timed = [t.user_attrs["time_s"] for t in study.trials if "time_s" in t.user_attrs]
    fixed = [t["total"] - t["epochs"] for t in timed]
    accs = [t.user_attrs["val_acc"] for t in study.trials if "val_acc" in t.user_attrs]
    return {
        "wall_s": wall,
        "trials_per_hour": trials / wall * 3600,
        "mean_fixed_cost_s": statistics.fmean(fixed) if fixed else None,
        "mean_trial_s": statistics.fmean(t["total"] for t in timed) if timed else None,
        "mean_val_acc": statistics.fmean(accs) if accs else None,
    }


def report(runs: dict[str, dict], overrides: list[str]) -> None:
    """The figures of the runs so far (written after each, so a run cut short keeps the ones before it)."""
    device = device_name()
    base = runs["1 worker"]
    result = {
        "device": device,
        "cpus": os.cpu_count(),
        "space": args.space,
        "trials": args.trials,
        "overrides": overrides,
        "runs": runs,
        "ratios": {label: r["trials_per_hour"] / base["trials_per_hour"] for label, r in runs.items()},
    }
    lines = [
        f"# Search throughput on {device} ({result['cpus']} CPUs)",
        "",
        f"`python benchmarks/search_throughput.py {' '.join(sys.argv[1:])}`",
        "",
        "| run | wall s | trials/hour | ratio to 1 worker | mean trial s | mean fixed cost s | mean val_acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in runs.items():
        lines.append(
            f"| {label} | {r['wall_s']:.1f} | {r['trials_per_hour']:.0f} | {result['ratios'][label]:.2f} | "
            f"{r['mean_trial_s']:.2f} | {r['mean_fixed_cost_s']:.2f} | {r['mean_val_acc']:.4f} |"
        )
    write_results("search_throughput", result, "\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="mbv3_small")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="CPU (or unpinned) worker processes")
    parser.add_argument("--per-gpu", type=int, default=0, help="trials per GPU instead of --workers")
    parser.add_argument(
        "--cuda-graph", action="store_true", help="a third run: one trial at a time with train.cuda_graph=true"
    )
    args, overrides = parser.parse_known_args()
    if args.cuda_graph and not torch.cuda.is_available():
        parser.error("--cuda-graph captures training steps as CUDA graphs and needs a CUDA device")
    parallel = [f"search.trials_per_gpu={args.per_gpu}"] if args.per_gpu else [f"search.workers={args.workers}"]
    variants = {"1 worker": [], " ".join(parallel): parallel}
    if args.cuda_graph:
        variants["1 worker, train.cuda_graph=true"] = ["train.cuda_graph=true"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # Build the latency table once, outside the timed runs.
        subprocess.run(
            [sys.executable, "-m", "nas.latency", "build-table", f"+space={args.space}", *overrides],
            cwd=folder,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        runs: dict[str, dict] = {}
        for n, (label, extra) in enumerate(variants.items()):
            runs[label] = run(folder, f"run{n}", args.trials, extra, overrides)
            report(runs, overrides)
