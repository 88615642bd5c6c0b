"""Ctrl-C and kill, handled alike by the commands that write many files (build, synth), and a
reader that closes stdout early (``| head``).

``StopSignals`` turns the first SIGINT or SIGTERM into ``KeyboardInterrupt`` in the main
thread, so the command's own cleanup (workers ended, temporaries removed) runs and it exits
130. Later signals are ignored: a second Ctrl-C, or ``timeout``'s signal to the whole process
group, cannot break off the cleanup the first started. After an interrupt they stay ignored
until the process ends, because at exit Python resets its handlers to the default and a late
signal would then kill the process mid-exit (status -2, not 130). The handlers are installed
whatever the process inherited, so a background job (SIGINT ignored) stops the same way.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from types import FrameType, TracebackType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager: SIGINT and SIGTERM raise ``KeyboardInterrupt`` once (main thread only)."""

    def __init__(self) -> None:
        self.count = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.count == 1:
            raise KeyboardInterrupt

    def __enter__(self) -> StopSignals:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.count else old)


def quiet_when_stdout_closes(main: Callable[[], int]) -> int:
    """Run a command's ``main``; if its stdout's reader has gone (``| head -3``), end quietly.

    Python ignores SIGPIPE, so a write to a closed pipe raises ``BrokenPipeError``: at a
    ``print``, or at the flush on exit, where it can no longer be caught. As the Python docs'
    "Note on SIGPIPE" advises, stdout is flushed here and, once the pipe is closed, pointed at
    devnull, so nothing writes to it again; the status is then 1, as Python's own on EPIPE.
    """
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return status
