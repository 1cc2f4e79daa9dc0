"""SIGTERM / Ctrl-C during training: finish the running step, save, exit (instead of dying between saves).

`stop = StopRequests().install()` sets handlers that only record the signal; the loop reads `stop.signal` between
steps (every process agrees on it in a multi-process run), saves the last step and raises `Interrupted`, which
`python -m train.lora` turns into one line and exit status 128 + the signal number, as a shell reports a killed job.
A second signal while saving is left to the default handler (a user who presses Ctrl-C twice means it).
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopRequests:
    def __init__(self):
        self.signal: Optional[int] = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        self.signal = signum
        for s, old in self._old.items():  # the next one acts as it would have
            signal.signal(s, old)

    def install(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def uninstall(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}
