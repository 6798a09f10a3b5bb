"""Restart with backoff: when to start again a process that exited.

One policy for every supervisor of the node (``msknode serve``'s parts, the listener's
processes): wait 1 s, 2 s, 4 s ... up to `max_delay` after each exit; with `stable_seconds`,
a process that ran that long before exiting starts the count again.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RestartBackoff:
    """The restart schedule of one supervised process (times from `time.monotonic`)."""

    max_delay: float = 30.0
    stable_seconds: float | None = 60.0  # None: the count never resets
    failures: int = 0
    restart_at: float | None = None  # set while waiting to restart

    def exited(self, now: float, started_at: float) -> float:
        """Records an exit; returns the delay before the restart (also set as `restart_at`)."""
        if self.stable_seconds is not None and now - started_at >= self.stable_seconds:
            self.failures = 0
        self.failures += 1
        delay = min(self.max_delay, 2.0 ** (self.failures - 1))
        self.restart_at = now + delay
        return delay

    @property
    def waiting(self) -> bool:
        """An exit was recorded and the process was not started again yet."""
        return self.restart_at is not None

    def due(self, now: float) -> bool:
        return self.restart_at is not None and now >= self.restart_at

    def started(self) -> None:
        self.restart_at = None
