"""SIGINT / SIGTERM during a search or a retrain: stop the running work cleanly, record it, tell how to resume.

Both signals raise :class:`Interrupted`, a BaseException that is not a
KeyboardInterrupt: Lightning turns a KeyboardInterrupt inside ``fit`` into
``sys.exit(1)`` (and its own SIGTERM handling into a ``SystemExit``), which
would leave an Optuna trial RUNNING or a retrain exiting 0; this one passes
through Lightning unchanged and the caller records it.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class Interrupted(BaseException):
    def __init__(self, signame: str) -> None:
        super().__init__(f"interrupted by {signame}")
        self.signame = signame

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signame, 1)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, the first SIGINT/SIGTERM raises Interrupted; later ones are ignored during cleanup."""
    fired: list[str] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if fired:
            return
        fired.append(signal.Signals(signum).name)
        raise Interrupted(fired[0])

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
