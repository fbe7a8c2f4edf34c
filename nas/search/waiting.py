"""Waiting for trials that other processes run, or that a killed process left RUNNING."""

from __future__ import annotations

import time
from typing import Any


class RunningTrialsWait:
    """Waiting at the end of a search for trials that other processes run, or that a killed one left RUNNING.

    Optuna fails a trial whose heartbeat is older than the grace period, but a process killed between
    ``ask()`` and its first heartbeat leaves a trial with none, which it never reclaims: every rerun would
    wait for ever. After two grace periods without progress, each trial still waited for gets one
    heartbeat recorded (harmless for a live trial, whose own thread keeps beating), so Optuna's rule
    applies to it and the wait ends within one more grace period.
    """

    def __init__(self, storage: Any, study_name: str, heartbeat_s: int, announce: bool) -> None:
        self.storage = storage
        self.study_name = study_name
        self.grace = 2 * heartbeat_s
        self.announce = announce
        self.since: float | None = None
        self.nudged: set[int] = set()

    def reset(self) -> None:
        self.since = None

    def step(self, running: list[int]) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since = now
            if self.announce:
                print(
                    f"waiting for {len(running)} running trial(s) {running} (another worker, or left by a killed "
                    f"run: such trials are retried after {self.grace} s without heartbeat)",
                    flush=True,
                )
        elif now - self.since > 2 * self.grace:
            study_id = self.storage.get_study_id_from_name(self.study_name)
            for number in sorted(set(running) - self.nudged):
                trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, number)
                self.storage.record_heartbeat(trial_id)
                self.nudged.add(number)
                print(
                    f"trial {number} made no progress for {now - self.since:.0f} s: if its process is gone (killed "
                    f"before its first heartbeat) it is failed and retried in {self.grace} s",
                    flush=True,
                )
        time.sleep(max(1.0, min(5.0, self.grace / 2)))
