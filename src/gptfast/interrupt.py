"""Stopping a run cleanly: the first Ctrl-C (SIGINT) or SIGTERM becomes a request that the training loop
honours after the current step; a second one interrupts at once (:class:`Interrupted`).

A run a signal stopped exits with 128 + the signal's number, as a shell reports a process the signal
killed (130 for SIGINT, 143 for SIGTERM), so a scheduler can tell preemption from completion.
"""

from __future__ import annotations

import signal
import sys
import threading


class Interrupted(KeyboardInterrupt):
    """A second signal: the run stops now, inside its step (the last checkpoint stays as it was)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(signum: int) -> int:
    """The exit status of a run stopped by signal ``signum``: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signum


class StopRequest:
    """Inside ``with StopRequest() as stop:``, the first SIGINT/SIGTERM sets ``stop.requested`` (and
    ``stop.signum``) and says so on stderr; the same signal again raises :class:`Interrupted`. The
    other signal after the first changes nothing: under torchrun, Ctrl-C reaches a worker twice, as
    the terminal's SIGINT and as the SIGTERM torchrun sends on.

    The handlers are installed only in the main thread (Python delivers signals there) and the
    previous ones are restored on exit.
    """

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self._announce = announce
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            if signum == self.signum:  # the same signal again: stop now
                raise Interrupted(signum)
            return  # another one: torchrun relaying Ctrl-C as SIGTERM to a worker that got the SIGINT too
        self.signum = signum
        if self._announce:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"\n{name}: stopping after this step (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
