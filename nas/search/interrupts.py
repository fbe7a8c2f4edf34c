"""SIGINT / SIGTERM during a search: stop the running trial cleanly, record it, tell how to resume.

Both signals raise :class:`SearchInterrupted`, a BaseException that is not a
KeyboardInterrupt: Lightning turns a KeyboardInterrupt inside ``fit`` into
``sys.exit(1)``, which would leave the Optuna trial RUNNING; this one passes
through Lightning unchanged and the objective records it.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class SearchInterrupted(BaseException):
    def __init__(self, signame: str) -> None:
        super().__init__(f"interrupted by {signame}")
        self.signame = signame

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signame, 1)


@contextlib.contextmanager
def signals_interrupt_search() -> Iterator[None]:
    """Within the block, the first SIGINT/SIGTERM raises SearchInterrupted; later ones are ignored during cleanup."""
    fired: list[str] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if fired:
            return
        fired.append(signal.Signals(signum).name)
        raise SearchInterrupted(fired[0])

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
