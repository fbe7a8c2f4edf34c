"""Trials per hour of the same short search with 1 worker and with k workers (or k trials per GPU).

    python benchmarks/search_throughput.py --workers 2 --trials 8 data=digits train.epochs=1
    python benchmarks/search_throughput.py --per-gpu 4 --trials 40 data=imagefolder data.root=/tmp/cifar10-sub
    python benchmarks/search_throughput.py --per-gpu 1 --cuda-graph --trials 40 data=imagefolder data.root=...

Runs ``python -m nas.search`` twice in a scratch folder (fresh studies, table latency so that
concurrent workers never measure), prints trials/hour for both, their ratio and the per-trial
fixed cost (trial wall time minus time spent in epochs), and writes
benchmarks/results/search_throughput-<device>.json and .md.
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="mbv3_small")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="CPU (or unpinned) worker processes")
    parser.add_argument("--per-gpu", type=int, default=0, help="trials per GPU instead of --workers")
    parser.add_argument(
        "--cuda-graph", action="store_true", help="the second run also captures its training steps (train.cuda_graph)"
    )
    args, overrides = parser.parse_known_args()
    if args.cuda_graph and not torch.cuda.is_available():
        parser.error("--cuda-graph captures training steps as CUDA graphs and needs a CUDA device")
    parallel = [f"search.trials_per_gpu={args.per_gpu}"] if args.per_gpu else [f"search.workers={args.workers}"]
    if args.cuda_graph:  # the baseline stays one-at-a-time eager trials
        parallel.append("train.cuda_graph=true")
    k = args.per_gpu or args.workers
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # Build the latency table once, outside the timed runs.
        subprocess.run(
            [sys.executable, "-m", "nas.latency", "build-table", f"+space={args.space}", *overrides],
            cwd=folder,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        one = run(folder, "one", args.trials, [], overrides)
        many = run(folder, "many", args.trials, parallel, overrides)
    device = device_name()
    result = {
        "device": device,
        "cpus": os.cpu_count(),
        "space": args.space,
        "trials": args.trials,
        "parallel": " ".join(parallel),
        "overrides": overrides,
        "one_worker": one,
        f"{k}_workers": many,
        "ratio": many["trials_per_hour"] / one["trials_per_hour"],
    }
    lines = [
        f"# Search throughput on {device} ({result['cpus']} CPUs)",
        "",
        f"`python benchmarks/search_throughput.py {' '.join(sys.argv[1:])}`",
        "",
        "| run | wall s | trials/hour | mean trial s | mean fixed cost s | mean val_acc |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in (("1 worker", one), (" ".join(parallel), many)):
        lines.append(
            f"| {label} | {r['wall_s']:.1f} | {r['trials_per_hour']:.0f} | {r['mean_trial_s']:.2f} | "
            f"{r['mean_fixed_cost_s']:.2f} | {r['mean_val_acc']:.4f} |"
        )
    lines += ["", f"ratio: {result['ratio']:.2f}x"]
    write_results("search_throughput", result, "\n".join(lines))
