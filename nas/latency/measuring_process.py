"""ONNX Runtime and OpenVINO run in a child process of their own, one per runtime configuration.

The search process exports a network to an ONNX file; the child loads the file in the runtime and times it.
Training never shares a process with a runtime's thread pools and allocators, and a runtime that crashes on a
network fails that network's measurement (the next one starts a fresh child) instead of the whole search.

The protocol is one JSON object a line over the child's stdin and a private copy of its stdout (the runtimes'
own prints go to stderr): ``start`` (the runtime and its options) answers its version and what it offers,
``open`` (an ONNX file, its input shape, threads) a handle or a refusal, ``take`` (a handle, warm-up,
repeats) the timed samples in ms, ``close`` drops a handle. The child imports only the standard library,
numpy and the runtime (:mod:`nas.latency.sessions`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

PROTOCOL = 1


class MeasuringFailed(Exception):
    """The runtime refused the file, or its process died; the message says which, in one line."""


class RuntimeNotInstalled(Exception):
    """The runtime's package cannot be imported by the measuring process."""


# ---------------------------------------------------------------------------------------------------- the child


def _answer(state: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    from nas.latency import sessions

    op = request.get("op")
    if op == "start":
        try:
            state["sessions"] = sessions.SESSIONS[request["runtime"]](**request.get("options", {}))
        except sessions.RuntimeMissing as exc:
            return {"missing": str(exc)}
        return {"protocol": PROTOCOL, "pid": os.getpid(), **state["sessions"].describe()}
    if op == "open":
        try:
            run = state["sessions"].open(request["path"], tuple(request["shape"]), int(request["threads"]))
        except sessions.SessionRefused as exc:
            return {"refused": str(exc)}
        state["next"] = handle = state.get("next", 0) + 1
        state.setdefault("open", {})[handle] = run
        return {"handle": handle}
    if op == "take":
        run = state.get("open", {}).get(request["handle"])
        if run is None:
            return {"error": f"no open network {request['handle']}"}
        return {"samples": sessions.timed_calls(run, int(request["warmup"]), int(request["repeats"]))}
    if op == "close":
        state.get("open", {}).pop(request.get("handle"), None)
        return {}
    return {"error": f"unknown request {op!r}"}


def serve(requests: IO[str], answers: IO[str]) -> None:
    """Answer requests until the parent closes the pipe; a bad request is answered, never fatal."""
    state: dict[str, Any] = {}
    for line in requests:
        try:
            answer = _answer(state, json.loads(line))
        except Exception as exc:  # a malformed request: say so and go on
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


def main() -> None:
    answers = os.fdopen(os.dup(1), "w")  # the protocol's own copy of stdout ...
    os.dup2(2, 1)  # ... and whatever the runtimes print goes to stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the search, which closes this process
    serve(sys.stdin, answers)


# --------------------------------------------------------------------------------------------------- the parent


def _child_env() -> dict[str, str]:
    """The parent's environment, with this package importable however the parent found it."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


class MeasuringProcess:
    """One child measuring in one runtime configuration; started again after it dies."""

    def __init__(self, runtime: str, options: dict[str, Any]) -> None:
        self.runtime, self.options = runtime, options
        self._lock = threading.Lock()
        self._unused: list[tuple[int, int | None]] = []  # handles whose sampler was collected, not yet closed
        self._proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None
        self.described: dict[str, Any] = self._start()

    def _start(self) -> dict[str, Any]:
        if self._log is not None:
            self._log.close()
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 -- the child's stderr, read back when it dies
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "nas.latency.measuring_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=_child_env(),
            text=True,
            start_new_session=True,  # a Ctrl-C in the terminal is the search's to handle, not the child's
        )
        try:
            answer = self._exchange({"op": "start", "runtime": self.runtime, "options": self.options})
        except MeasuringFailed:  # options the runtime does not take: no child left behind
            self.close()
            raise
        if "missing" in answer:
            self.close()
            raise RuntimeNotInstalled(answer["missing"])
        return answer

    def _death(self) -> str:
        assert self._proc is not None
        code = self._proc.wait()
        why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        tail = ""
        if self._log is not None:
            self._log.seek(0)
            lines = [ln for ln in self._log.read().decode(errors="replace").splitlines() if ln.strip()]
            tail = f": {lines[-1][:200]}" if lines else ""
        self._proc = None
        return f"the {self.runtime} measuring process died ({why}{tail})"

    def _exchange(self, request: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            raise MeasuringFailed(self._death())
        answer = json.loads(line)
        if "error" in answer:
            raise MeasuringFailed(f"the {self.runtime} measuring process: {answer['error']}")
        return answer

    def request(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if self._proc is None:  # it died measuring an earlier network: a fresh one for this one
                self._start()
            while self._unused:  # closed here, never from a finalizer (it may run in the middle of an exchange)
                handle, pid = self._unused.pop()
                if pid == self.pid:
                    self._exchange({"op": "close", "handle": handle})
            return self._exchange(request)

    def sampler(self, path: Path, input_shape: tuple[int, ...], threads: int, warmup: int, repeats: int,
                max_cv: float = 0.0, attempts: int = 1) -> Callable[[], list[float]]:  # fmt: skip
        """The file loaded in the child; calling the result takes one measurement (the caller decides how many:
        ``max_cv`` and ``attempts`` matter to a remote agent only). Raises MeasuringFailed."""
        answer = self.request({"op": "open", "path": str(path), "shape": list(input_shape), "threads": threads})
        if "refused" in answer:
            raise MeasuringFailed(answer["refused"])
        handle, pid = answer["handle"], self.pid

        def take() -> list[float]:
            if self.pid != pid:
                raise MeasuringFailed(f"the {self.runtime} measuring process ended after this network was loaded")
            return self.request({"op": "take", "handle": handle, "warmup": warmup, "repeats": repeats})["samples"]

        weakref.finalize(take, self._unused.append, (handle, pid))
        return take

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(Exception):
                assert proc.stdin is not None
                proc.stdin.close()  # the child's loop ends on end of input
                proc.wait(timeout=10)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


_PROCESSES: dict[str, MeasuringProcess] = {}


def measuring_process(runtime: str, options: dict[str, Any]) -> MeasuringProcess:
    """The one child for this runtime configuration in this process (runtime objects made per trial share it)."""
    key = json.dumps([runtime, options], sort_keys=True)
    process = _PROCESSES.get(key)
    if process is None:
        process = _PROCESSES[key] = MeasuringProcess(runtime, options)
    return process


@atexit.register
def _close_all() -> None:
    for process in _PROCESSES.values():
        process.close()
    _PROCESSES.clear()


if __name__ == "__main__":
    main()
