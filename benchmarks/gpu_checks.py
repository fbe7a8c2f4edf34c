"""Check the whole product on a GPU machine in one call: every stage inside one time budget.

    python benchmarks/gpu_checks.py --data-root /tmp/cifar10-sub                    # --budget-s 480 on CUDA
    python benchmarks/gpu_checks.py --data-root /tmp/cifar10-sub --stages latency train_loop --budget-s 200
    python benchmarks/gpu_checks.py --cpu                                            # dry run here, < 3 minutes

A GPU machine is lent for 15 minutes in all (its start included) and one command may run 10, so the checks are
one command whose stages share ``--budget-s`` seconds, in order of value:

1. ``tests``: ``pytest -m gpu`` (every CUDA path; on a CPU they skip, saying why);
2. ``latency``: ``nas.latency validate`` on ``mbv3`` with the table in CUDA-graph mode at batch 1 and 64
   (``--networks`` each): Spearman and MAPE; one TensorRT validate where TensorRT is installed;
3. ``train_loop``: one epoch of CIFAR-10 at 32 px through the pipeline, eager and with
   ``train.cuda_graph=true``, against a plain PyTorch loop (``benchmarks/train_loop.py``);
4. ``throughput``: trials/hour with 1 and 4 trials per GPU, and one at a time with capture
   (``benchmarks/search_throughput.py``);
5. ``study``: a short ``mbv3_small`` study with the references and a finalist round.

Each stage gets its share (``SHARES``) of what is left of the budget when it starts, so time a stage leaves
unused goes to the later ones. A stage still running at the end of its share is cut: SIGTERM to its process
group (the search and the benchmarks keep what they measured: a search records its trials, a benchmark writes
its figures after each run), SIGKILL ``GRACE_S`` later. After every stage the summary
``gpu_checks-<device>.md`` and ``.json`` (each stage's status, time, share and figures) is written again, so a
call killed at its limit still returns what it reached. Everything goes under ``$NAS_BENCH_RESULTS`` when set
(collect it from wherever the call ran), else ``benchmarks/results/``; logs in ``gpu_checks-<device>/``.

``--cpu`` runs the same stages here on tiny inputs (the digits set, the tests' two-stage space, a few
trials), so the call is known to work before a GPU is there; its figures stay beside its logs (git-ignored).
Run it from a scratch folder: the stages write their studies and tables under ./outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench_output import RESULTS, device_name

STAGES = ("tests", "latency", "train_loop", "throughput", "study")
# Each stage's share of the budget left when it starts (normalised over the stages still to run).
SHARES = {"tests": 0.12, "latency": 0.30, "train_loop": 0.14, "throughput": 0.20, "study": 0.24}
# A dry run on two CPU cores spends its time elsewhere: a search with two workers is three processes' imports.
DRY_SHARES = {"tests": 0.12, "latency": 0.16, "train_loop": 0.12, "throughput": 0.36, "study": 0.24}
GRACE_S = 15  # after SIGTERM, before SIGKILL: a search ends its trial's records, a benchmark writes its figures
MIN_STAGE_S = 5  # a stage with less left than this is not started
TINY_SPACE = Path(__file__).resolve().parents[1] / "tests" / "tiny_space.yaml"  # the tests' own small space
STUDY = "gpu-check-mbv3_small"


@dataclass
class Stage:
    name: str
    commands: list[list[str]]
    figures: Callable[[Path, float], dict] = lambda log, started: {}  # from its log and files written since start


@dataclass
class StageResult:
    name: str
    status: str  # ok | failed (exit N) | cut after N s (its share) | not run (budget spent)
    seconds: float
    share_s: float
    log: str
    figures: dict = field(default_factory=dict)


def allowance(left_s: float, name: str, to_run: list[str], shares: dict[str, float] | None = None) -> float:
    """The stage's seconds: its share of what is left, among the stages still to run (itself included)."""
    shares = shares or SHARES
    return left_s * shares[name] / sum(shares[n] for n in to_run)


def grace(share_s: float) -> float:
    """Seconds a cut stage gets to end after SIGTERM, within its share: GRACE_S, less for a short stage."""
    return min(GRACE_S, 0.2 * share_s)


def run_command(cmd: list[str], log, cwd: Path, env: dict, limit_s: float, grace_s: float = GRACE_S) -> str:
    """One command in a process group of its own; past ``limit_s`` it is asked to stop (SIGTERM), then killed."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=max(limit_s, 1))
    except subprocess.TimeoutExpired:
        _stop_group(proc, grace_s)
        return "cut"
    return "ok" if code == 0 else f"failed (exit {code})"


def _stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(stage: Stage, share_s: float, logs: Path, cwd: Path, env: dict) -> StageResult:
    """The stage's commands in turn, cut at its share (less the grace a cut process gets to end)."""
    t0, started = time.perf_counter(), time.time()
    log_path = logs / f"{stage.name}.log"
    status = "ok"
    with log_path.open("w") as log:
        for cmd in stage.commands:
            left = share_s - grace(share_s) - (time.perf_counter() - t0)
            status = run_command(cmd, log, cwd, env, left, grace(share_s)) if left > 0 else "cut"
            if status != "ok":
                break
    seconds = time.perf_counter() - t0
    if status == "cut":
        status = f"cut after {seconds:.0f} s (its share {share_s:.0f} s)"
    try:
        figures = stage.figures(log_path, started)
    except Exception as exc:  # a figure that cannot be read is reported, never the end of the checks
        figures = {"error": f"{type(exc).__name__}: {exc}"}
    return StageResult(stage.name, status, seconds, share_s, str(log_path.relative_to(logs.parent)), figures)


def run_stages(stages: list[Stage], budget_s: float, logs: Path, write: Callable[[list[StageResult]], None],
               cwd: Path | None = None, env: dict | None = None,
               shares: dict[str, float] | None = None) -> list[StageResult]:  # fmt: skip
    """Every stage within ``budget_s`` in all; the summary is written after each one."""
    t0, results = time.perf_counter(), []
    logs.mkdir(parents=True, exist_ok=True)
    for i, stage in enumerate(stages):
        left = budget_s - (time.perf_counter() - t0)
        share = allowance(left, stage.name, [s.name for s in stages[i:]], shares)
        if share < MIN_STAGE_S:
            results.append(StageResult(stage.name, "not run (budget spent)", 0.0, share, ""))
        else:
            results.append(run_stage(stage, share, logs, cwd or Path.cwd(), env or dict(os.environ)))
        print(f"| {stage.name} | {results[-1].status} | {results[-1].seconds:.0f} s |", flush=True)
        write(results)
    return results


# What each stage measured, read back from its log and the files it wrote.


def pytest_counts(log: Path, started: float) -> dict:
    """pytest's closing line: passed, failed, skipped, deselected, errors."""
    closing = [ln for ln in log.read_text().splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?)\b", ln)]
    found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", closing[-1]) if closing else []
    return {kind: int(n) for n, kind in found}


def validate_reports(log: Path, started: float) -> dict:
    out = {}
    for path in re.findall(r"report written to (\S+)", log.read_text()):
        report = json.loads(Path(path).read_text())
        settings = report["settings"]
        key = f"{settings.get('runtime', {}).get('name', 'torch')}-b{settings['batch_size']}-{settings['mode']}"
        out[key] = {k: report[k] for k in ("n", "spearman", "mape_pct", "measured_min_ms", "measured_max_ms",
                                           "repeat_cv_pct", "table_entries")}  # fmt: skip
    return out


def results_file(benchmark: str, folder: Path) -> Callable[[Path, float], dict]:
    """The figures a benchmark wrote to ``folder`` while its stage ran."""

    def read(log: Path, started: float) -> dict:
        path = folder / f"{benchmark}-{device_name().replace(' ', '_').lower()}.json"
        return json.loads(path.read_text()) if path.is_file() and path.stat().st_mtime >= started else {}

    return read


def study_round(log: Path, started: float) -> dict:
    """The study's trials and its finalist round, as the study keeps them."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{Path.cwd()}/outputs/optuna.db")
    states = [t.user_attrs.get("state") for t in study.trials]
    keep = ("trial", "reference", "sample", "search_acc", "val_acc_mean", "val_acc_low", "val_acc_high", "runs",
            "measured_ms", "over_budget", "latency_fallback", "verdicts")  # fmt: skip
    record = study.user_attrs.get("finalist_round") or {}
    return {
        "trials": {s: states.count(s) for s in set(states) if s},
        "winner": record.get("winner"),
        "kendall_tau": record.get("kendall_tau"),
        "finalists": [{k: row.get(k) for k in keep} for row in record.get("candidates", [])],
    }


def stages_for(args: argparse.Namespace, figures_dir: Path) -> list[Stage]:
    """The GPU recipe, or with ``--cpu`` the same commands on tiny inputs; the benchmarks write to
    ``figures_dir``."""
    py, here = sys.executable, str(Path(__file__).parent)
    nas = lambda command, *a: [py, "-m", f"nas.{command}", *a]  # noqa: E731
    bench = lambda script, *a: [py, f"{here}/{script}.py", *a]  # noqa: E731
    tests = [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(Path(here).parent / "tests")]
    # fmt: off
    if args.cpu:
        space = f"+space={TINY_SPACE}"
        fast = ["data=digits", "train.epochs=1", "latency.device=cpu", "latency.repeats=5", "latency.warmup=2"]
        latency = [nas("latency", "validate", space, "n=4", "latency.calibrate=2", "latency.device=cpu",
                       f"latency.batch_size={b}", "latency.repeats=5") for b in (1, 4)]
        train_loop = [bench("train_loop", "data=digits", "data.repeat=1", "train.limit_train_images=256")]
        throughput = [bench("search_throughput", "--space", str(TINY_SPACE), "--trials", "2", "--workers", "2",
                            "search.plots=false", "search.finalists=0", *fast)]
        study = [nas("search", space, "trials=3", f"study.name={STUDY}", "search.finalists=1",
                     "search.finalist_epochs=1", "search.finalist_seeds=2", "search.fidelity_sample=0",
                     "search.plots=false", *fast)]
    else:
        folder = ["data=imagefolder", f"data.root={args.data_root}"]
        validate = ["validate", "+space=mbv3", f"n={args.networks}", "latency.device=cuda"]
        latency = [nas("latency", *validate, "latency.mode=cudagraph", f"latency.batch_size={b}") for b in (1, 64)]
        if _has_tensorrt():
            latency.append(nas("latency", *validate, "latency/runtime=tensorrt", "latency.batch_size=1"))
        train_loop = [bench("train_loop", *folder)]
        throughput = [bench("search_throughput", "--per-gpu", "4", "--cuda-graph", "--trials", str(args.trials),
                            *folder, f"train.epochs={args.epochs}", "search.plots=false", "search.finalists=0")]
        study = [nas("search", "+space=mbv3_small", f"trials={args.trials}", f"train.epochs={args.epochs}",
                     "latency.device=cuda", f"study.name={STUDY}", "search.finalists=2", "search.finalist_seeds=2",
                     "search.fidelity_sample=1", f"search.finalist_epochs={2 * args.epochs}", *folder)]
    # fmt: on
    return [
        Stage("tests", [tests], pytest_counts),
        Stage("latency", latency, validate_reports),
        Stage("train_loop", train_loop, results_file("train_loop", figures_dir)),
        Stage("throughput", throughput, results_file("search_throughput", figures_dir)),
        Stage("study", study, study_round),
    ]


def _has_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def summary_writer(device: str, budget_s: float, dry: bool) -> Callable[[list[StageResult]], None]:
    def write(results: list[StageResult]) -> None:
        command = f"python benchmarks/gpu_checks.py {' '.join(sys.argv[1:])}"
        rows = [f"| {r.name} | {r.status} | {r.seconds:.0f} s | {r.share_s:.0f} s | `{r.log}` |" for r in results]
        figures = [f"- {r.name}: `{json.dumps(r.figures, default=str)[:2000]}`" for r in results if r.figures]
        text = "\n".join([f"# GPU checks on {device_name()}{' (dry run, --cpu)' if dry else ''}", "",
                          f"`{command}` (budget {budget_s:.0f} s)", "",
                          "| stage | status | time | share | log |", "|---|---|---|---|---|", *rows, "",
                          "Figures:", "", *figures, ""])  # fmt: skip
        summary = {"device": device_name(), "command": command, "budget_s": budget_s, "dry_run": dry,
                   "stages": [asdict(r) for r in results]}  # fmt: skip
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"gpu_checks-{device}.md").write_text(text)
        (RESULTS / f"gpu_checks-{device}.json").write_text(json.dumps(summary, indent=1, default=str))

    return write


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--budget-s", type=float, default=None, help="seconds for every stage together (480; --cpu 175)")
    p.add_argument("--data-root", default="/tmp/cifar10-sub", help="an image folder (CIFAR-10 layout)")
    p.add_argument("--trials", type=int, default=6, help="networks trained by each throughput run and the study")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--networks", type=int, default=24, help="networks measured by each latency validation")
    p.add_argument("--cpu", action="store_true", help="dry run on this machine with tiny inputs")
    args = p.parse_args()
    budget = args.budget_s if args.budget_s is not None else (175.0 if args.cpu else 480.0)
    device = device_name().replace(" ", "_").lower() + ("-dry" if args.cpu else "")
    logs = RESULTS / f"gpu_checks-{device}"
    # A dry run's benchmark figures stay beside its logs, out of the committed results/.
    figures_dir = logs if args.cpu else RESULTS
    env = dict(os.environ) | {"NAS_BENCH_RESULTS": str(figures_dir)}
    stages = [s for s in stages_for(args, figures_dir) if s.name in args.stages]
    write = summary_writer(device, budget, args.cpu)
    results = run_stages(stages, budget, logs, write, env=env, shares=DRY_SHARES if args.cpu else SHARES)
    if any(r.status != "ok" for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
