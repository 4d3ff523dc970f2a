"""Stopping a run cleanly: the first Ctrl-C (SIGINT) or SIGTERM becomes a request that the training loop
honours after the current step; a second one interrupts at once."""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Inside ``with StopRequest() as stop:``, the first SIGINT/SIGTERM sets ``stop.requested``.

    The handlers are installed only in the main thread (Python delivers signals there) and the
    previous ones are restored on exit.
    """

    def __init__(self):
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
