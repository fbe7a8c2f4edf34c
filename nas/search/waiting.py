"""Waiting for what other processes do: trials they run (or a killed process left RUNNING), a study that the
main process has yet to prepare."""

from __future__ import annotations

import time
from typing import Any

from nas.errors import NasError


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


def wait_for_main(storage: Any, study_name: str, prepared_attr: str, timeout_s: float, poll_s: float = 2.0) -> None:
    """A worker started beside its main process (an array job, an indexed Kubernetes Job: all at once) waits until
    the main process has prepared the study (its MLflow run, latency table and yardsticks) rather than making a
    study of its own that no run holds."""
    deadline, said = time.monotonic() + timeout_s, False
    while True:
        try:
            study_id = storage.get_study_id_from_name(study_name)
            if prepared_attr in storage.get_study_user_attrs(study_id):
                return
        except KeyError:  # not created yet
            pass
        if time.monotonic() > deadline:
            raise NasError(
                f"no main process prepared study {study_name} within search.join_timeout_s={timeout_s:g} s: start "
                f"the same command without search.role=worker first (it creates the study and its MLflow run), or "
                f"raise search.join_timeout_s"
            )
        if not said:
            print(f"waiting for the main process to prepare study {study_name}", flush=True)
            said = True
        time.sleep(poll_s)
