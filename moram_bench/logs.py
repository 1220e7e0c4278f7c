"""Every silencing of expected chatter, in one place.

* :func:`quiet_run` - process-wide, once per run: Lightning's info lines that repeat for
  each of a run's many short Trainers, and warnings that are expected by design (one
  open-ended epoch per task, no dataloader workers by default, eval-mode backbone).
* :func:`drop_log_messages` - records of the root logger (where open_clip logs) that
  contain given fragments, within a block.
* :func:`quiet_transformers` - transformers' weight-loading progress bars (and its load
  reports), within a block.
* :func:`no_warnings` - one warning category, within a block.
"""
from __future__ import annotations

import contextlib
import logging
import warnings

NOISY_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed", "lightning.pytorch.trainer.connectors.signal_connector")
EXPECTED_WARNINGS = (".*does not have many workers.*", ".*infer the `batch_size`.*", ".*LeafSpec.*",
                     ".*in eval mode at the start of training.*", ".*smaller than the logging interval.*")


def quiet_run() -> None:
    """Process-wide: Lightning's per-Trainer info lines and the expected warnings off."""
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


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


@contextlib.contextmanager
def quiet_transformers(errors_only: bool = True):
    """Within the block: no transformers weight-loading progress bars (they would flood run
    logs) and, with ``errors_only``, none of its load reports below ERROR."""
    import transformers.utils.logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    if errors_only:
        hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def no_warnings(category: type[Warning]):
    """Within the block, warnings of ``category`` are ignored."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category)
        yield
