"""Check the whole product on a GPU machine, in stages that each end within 10 minutes.

    python benchmarks/gpu_checks.py --data-root /tmp/cifar10-sub                  # every stage
    python benchmarks/gpu_checks.py --data-root /tmp/cifar10-sub --stages latency train_loop
    python benchmarks/gpu_checks.py --cpu                                          # dry run here, tiny inputs

Stages (each a subprocess, its whole output in benchmarks/results/gpu_checks-<device>/<stage>.log):

- ``tests``: ``pytest -m gpu`` (every CUDA path; on a CPU they skip, saying why);
- ``latency``: ``nas.latency validate`` on ``mbv3`` (cudagraph) at batch 1 and 64: Spearman and MAPE
  of the lookup table against measured networks;
- ``train_loop``: ``benchmarks/train_loop.py`` on CIFAR-10 at 32 px, eager and with
  ``train.cuda_graph=true``, against a plain PyTorch loop;
- ``throughput``: ``benchmarks/search_throughput.py`` with 1 vs 4 trials per GPU, and with capture;
- ``study``: a short CIFAR-10 study of ``mbv3_small`` with the reference networks.

``--cpu`` runs the same stages on this machine with tiny inputs (the digits set, a two-stage space, a few
trials), so the script is known to work before a GPU is there; its benchmark figures stay in its log folder.
Run it from a scratch folder: the stages write their studies and tables under ./outputs. A summary with
each stage's status and time goes to benchmarks/results/gpu_checks-<device>.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_output import RESULTS, device_name

STAGES = ("tests", "latency", "train_loop", "throughput", "study")
LIMIT_S = 590  # each stage ends within the device machine's 10-minute command limit
TINY_SPACE = Path(__file__).resolve().parents[1] / "tests" / "tiny_space.yaml"  # the tests' own small space


def stage_commands(args: argparse.Namespace) -> dict[str, list[list[str]]]:
    """The commands of each stage: the GPU recipe, or with ``--cpu`` the same commands on tiny inputs."""
    py, here = sys.executable, str(Path(__file__).parent)
    tests = [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(Path(here).parent / "tests")]
    if args.cpu:
        space = TINY_SPACE
        data = ["data=digits", "train.epochs=1", "latency.device=cpu", "latency.repeats=5", "latency.warmup=2"]
        return {
            "tests": [tests],
            "latency": [[py, "-m", "nas.latency", "validate", f"+space={space}", "n=4", "latency.calibrate=2",
                         "latency.device=cpu", f"latency.batch_size={b}", "latency.repeats=5"] for b in (1, 4)],
            "train_loop": [[py, f"{here}/train_loop.py", "data=digits", "train.limit_train_images=512"]],
            "throughput": [[py, f"{here}/search_throughput.py", "--space", str(space), "--trials", "2",
                            "--workers", "2", "search.plots=false", "search.finalists=0", *data]],
            "study": [[py, "-m", "nas.search", f"+space={space}", "trials=3", "search.finalists=1",
                       "search.finalist_epochs=1", "search.plots=false", *data]],
        }  # fmt: skip
    folder = ["data=imagefolder", f"data.root={args.data_root}"]
    return {
        "tests": [tests],
        "latency": [[py, "-m", "nas.latency", "validate", "+space=mbv3", f"n={args.networks}", "latency.device=cuda",
                     "latency.mode=cudagraph", f"latency.batch_size={b}"] for b in (1, 64)],
        "train_loop": [[py, f"{here}/train_loop.py", *folder]],
        "throughput": [[py, f"{here}/search_throughput.py", "--per-gpu", "4", "--trials", str(args.trials), *folder,
                        f"train.epochs={args.epochs}"],
                       [py, f"{here}/search_throughput.py", "--per-gpu", "1", "--cuda-graph", "--trials",
                        str(args.trials), *folder, f"train.epochs={args.epochs}"]],
        "study": [[py, "-m", "nas.search", "+space=mbv3_small", f"trials={args.trials}", f"train.epochs={args.epochs}",
                   "latency.device=cuda", "study.name=gpu-check-mbv3_small", *folder]],
    }  # fmt: skip


def run_stage(name: str, commands: list[list[str]], logs: Path, cwd: Path, env: dict) -> tuple[str, float]:
    """Run a stage's commands in turn, within LIMIT_S in all; ``ok``, ``failed (exit N)`` or ``timed out``."""
    t0 = time.perf_counter()
    with (logs / f"{name}.log").open("w") as log:
        for cmd in commands:
            left = LIMIT_S - (time.perf_counter() - t0)
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            try:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env, timeout=max(left, 1))
            except subprocess.TimeoutExpired:
                return "timed out", time.perf_counter() - t0
            if proc.returncode != 0:
                return f"failed (exit {proc.returncode})", time.perf_counter() - t0
    return "ok", time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--data-root", default="/tmp/cifar10-sub", help="an image folder (CIFAR-10 layout)")
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--networks", type=int, default=100, help="networks measured by the latency validation")
    p.add_argument("--cpu", action="store_true", help="dry run on this machine with tiny inputs")
    args = p.parse_args()
    device = device_name().replace(" ", "_").lower() + ("-dry" if args.cpu else "")
    logs = RESULTS / f"gpu_checks-{device}"
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    # A dry run's benchmark figures stay beside its logs, out of the committed results/.
    env = dict(os.environ) | ({"NAS_BENCH_RESULTS": str(logs)} if args.cpu else {})
    commands = stage_commands(args)
    for name in args.stages:
        status, seconds = run_stage(name, commands[name], logs, Path.cwd(), env)
        rows.append(f"| {name} | {status} | {seconds:.0f} s | `{logs.name}/{name}.log` |")
        print(rows[-1], flush=True)
    text = "\n".join([f"# GPU checks on {device_name()}{' (dry run, --cpu)' if args.cpu else ''}", "",
                      f"`python benchmarks/gpu_checks.py {' '.join(sys.argv[1:])}`", "",
                      "| stage | status | time | log |", "|---|---|---|---|", *rows, ""])  # fmt: skip
    (RESULTS / f"gpu_checks-{device}.md").write_text(text)
    if any("| ok |" not in row for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
