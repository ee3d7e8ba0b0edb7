"""SIGINT / SIGTERM while training: the loop stops after the current step and saves a resumable checkpoint."""
from __future__ import annotations

import contextlib
import signal
from typing import Callable


@contextlib.contextmanager
def stop_on_signals(request_stop: Callable[[int], None]):
    """Inside the block SIGINT and SIGTERM call `request_stop(signum)`; the previous handlers come back after."""
    previous = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[s] = signal.signal(s, lambda signum, frame: request_stop(signum))
        except ValueError:  # not the main thread: no handlers, request_stop() still works
            break
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
