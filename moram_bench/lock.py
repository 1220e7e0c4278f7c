"""An exclusive lock file naming its owner: one writer per run directory (and per sweep log).

The owner holds an ``flock`` on the file for as long as it lives; the kernel drops it when
the process dies, even by ``kill -9``, so a dead owner never blocks anybody: its lock file
is stale and is taken over with a note naming it. A live owner's lock is refused with one
line naming its pid and host.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from .errors import ConfigError


class RunLock:
    """An exclusive lock file holding its owner's pid and host (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: Optional[int] = None

    def owner(self) -> Optional[dict]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    @staticmethod
    def describe(owner: Optional[dict]) -> str:
        if not owner:
            return "another process (lock file without owner details)"
        return (f"pid {owner.get('pid')} on {owner.get('host')} (since {owner.get('since', '?')}; "
                f"lock file {owner.get('path', '')})").replace("; lock file )", ")")

    def _held_by_other(self) -> bool:
        """Is the lock file held (flock) by a live process other than this object?"""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def live_owner(self) -> Optional[str]:
        """A description of the live owner, or None (no lock file, a stale one, or ours)."""
        if self._fd is not None or not self.path.exists() or not self._held_by_other():
            return None
        return self.describe(self.owner())

    def acquire(self) -> Optional[dict]:
        """Take the lock (ConfigError naming the owner when it is held); returns the
        previous owner's details when a stale lock was taken over."""
        import fcntl

        stale = None
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ConfigError(f"{self.path.parent} is in use by {self.describe(self.owner())}; "
                                  "wait for it to end or stop it") from None
            # the file may have been unlinked (released) between open and flock: retry
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = self.owner()
            if previous and previous.get("pid") and previous.get("pid") != os.getpid():
                stale = previous
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "path": str(self.path)}
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
            os.fsync(fd)
            self._fd = fd
            return stale
        raise ConfigError(f"could not take the lock {self.path}")  # pragma: no cover

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        stale = self.acquire()
        if stale:
            print(f"note: took over the stale lock of {self.describe(stale)}", flush=True)
        return self

    def __exit__(self, *exc) -> None:
        self.release()
