"""Stop requests: SIGINT / SIGTERM during training ask the trainer to stop at the next step boundary.

The trainer agrees on the request across processes (any rank's signal stops all of them at the same
step), saves a checkpoint and returns. A second SIGINT raises KeyboardInterrupt at once.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class StopRequest:
    """The signal number of a pending stop request (`signum`), set by the installed handlers."""

    def __init__(self):
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        """Handle SIGINT and SIGTERM inside the block (main thread only); the old handlers come back after."""
        self.signum = None
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def request_stop(signum, _frame):
            if self.signum is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C does not wait for the step to finish
            self.signum = signum

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


__all__ = ["StopRequest"]
