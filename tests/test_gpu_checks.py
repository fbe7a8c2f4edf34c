"""The one GPU call (``benchmarks/gpu_checks.py``): stages share one budget, a stage past its share is cut and
keeps what it measured, and the summary is written after every stage."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_checks  # a script folder, not a package


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def measured(log, started) -> dict:
    """The figures a stage's log holds (as a real stage's figures come from what it wrote)."""
    return {"ms": [float(x) for x in re.findall(r"^measured (\S+)", log.read_text(), re.M)]}


def test_each_stage_gets_its_share_of_what_is_left_and_unused_time_goes_to_the_later_ones():
    names = list(gpu_checks.STAGES)
    budget, left, given = 480.0, 480.0, []
    for i, name in enumerate(names):  # every stage uses its whole share: together they use the budget exactly
        given.append(gpu_checks.allowance(left, name, names[i:]))
        left -= given[-1]
    assert sum(given) == pytest.approx(budget) and left == pytest.approx(0, abs=1e-9)
    assert given == pytest.approx([budget * gpu_checks.SHARES[n] for n in names])  # the shares sum to 1
    early = gpu_checks.allowance(budget - 10, "latency", names[1:])  # tests took 10 s of its 58
    assert early > budget * gpu_checks.SHARES["latency"]
    assert gpu_checks.allowance(100, "study", ["study"]) == 100  # the last stage gets whatever is left
    for shares in (gpu_checks.SHARES, gpu_checks.DRY_SHARES):  # every stage has one; together the whole budget
        assert set(shares) == set(names) and sum(shares.values()) == pytest.approx(1)
    assert gpu_checks.allowance(100, "throughput", ["throughput", "study"], gpu_checks.DRY_SHARES) == pytest.approx(60)


def test_a_stage_past_its_share_is_cut_keeps_what_it_measured_and_the_summary_is_still_written(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_checks, "GRACE_S", 2)
    monkeypatch.setattr(gpu_checks, "RESULTS", tmp_path)
    # A short share for the stage that overruns, long ones for the quick stages (which a busy machine slows).
    monkeypatch.setattr(gpu_checks, "SHARES", {"tests": 0.4, "latency": 0.1, "train_loop": 0.5})
    # Measures one figure, then overruns and ignores SIGTERM: it must be killed.
    stubborn = ("import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('pid', os.getpid()); print('measured 1.5 ms', flush=True); time.sleep(600)")  # fmt: skip
    stages = [
        gpu_checks.Stage("tests", [_python("print('1 passed, 2 skipped, 300 deselected in 9.0s')")],
                         gpu_checks.pytest_counts),
        gpu_checks.Stage("latency", [_python(stubborn), _python("print('never started')")], measured),
        gpu_checks.Stage("train_loop", [_python("print('measured 2.5 ms')")], measured),
    ]  # fmt: skip
    written = []
    write = gpu_checks.summary_writer("dev", 40, dry=True)

    def write_and_keep(results):
        write(results)
        written.append(json.loads((tmp_path / "gpu_checks-dev.json").read_text()))

    results = gpu_checks.run_stages(stages, 40, tmp_path / "logs", write_and_keep)
    assert results[0].status == "ok" and results[2].status == "ok"
    assert results[1].status.startswith("cut after ") and "its share" in results[1].status
    assert results[0].figures == {"passed": 1, "skipped": 2, "deselected": 300}
    assert results[1].figures == {"ms": [1.5]}  # what it printed before it was cut
    log = (tmp_path / "logs" / "latency.log").read_text()
    assert "never started" not in log  # the stage's next command
    with pytest.raises(ProcessLookupError):  # killed after ignoring SIGTERM, not left running
        os.kill(int(re.search(r"^pid (\d+)", log, re.M).group(1)), 0)
    assert results[2].figures == {"ms": [2.5]}  # the next stage ran after the cut one
    assert [len(w["stages"]) for w in written] == [1, 2, 3]  # written again after every stage
    assert written[1]["stages"][1]["status"].startswith("cut after ")
    md = (tmp_path / "gpu_checks-dev.md").read_text()
    assert "| latency | cut after " in md and "| train_loop | ok |" in md and "1.5" in md


def test_a_stage_with_no_time_left_is_not_run_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_checks, "MIN_STAGE_S", 30)  # a 20 s budget leaves no stage enough to start
    stages = [gpu_checks.Stage("tests", [_python("raise SystemExit(3)")])]
    results = gpu_checks.run_stages(stages, 20, tmp_path / "logs", lambda results: None)
    assert results[0].status == "not run (budget spent)"


def test_a_failing_command_fails_its_stage_and_the_rest_of_the_stage_is_skipped(tmp_path):
    stages = [gpu_checks.Stage("tests", [_python("raise SystemExit(3)"), _python("print('after')")])]
    results = gpu_checks.run_stages(stages, 600, tmp_path / "logs", lambda results: None)
    assert results[0].status == "failed (exit 3)"
    assert "after" not in (tmp_path / "logs" / "tests.log").read_text()  # neither run nor logged
