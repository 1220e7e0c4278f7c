"""The package's error types, in one small module that imports nothing of the package.

``ConfigError`` and ``StreamError`` are user errors: the CLI prints them as one line
``error: ...`` and exits with code 2. ``RunInterrupted`` is raised by the run's signal
handlers (SIGINT, SIGTERM); it is a ``BaseException`` like ``KeyboardInterrupt`` so that
no ``except Exception`` swallows it, but not a ``KeyboardInterrupt`` (Lightning turns
those into ``sys.exit(1)``).
"""
from __future__ import annotations

import signal


class ConfigError(ValueError):
    """A user-facing configuration problem: printed as one line, exit code 2."""


class StreamError(ConfigError):
    """A stream could not be built (missing or malformed data, bad definition)."""


class RunInterrupted(BaseException):
    """A run (or a sweep) was stopped by SIGINT or SIGTERM. ``saved`` says what is on disk
    and how to resume; the CLI exits with ``128 + signum`` (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, saved: str = ""):
        super().__init__(signum)
        self.signum = int(signum)
        self.saved = saved

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return f"interrupted by {self.signame}" + (f"; {self.saved}" if self.saved else "")
