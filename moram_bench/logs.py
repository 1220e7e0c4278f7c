"""Silencing log records that are expected and say nothing to a user."""
from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def drop_log_messages(*fragments: str):
    """Within the block, drop records logged on the ROOT logger (where open_clip logs) whose
    message contains any of ``fragments``; every other record passes."""

    def keep(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in fragments)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
