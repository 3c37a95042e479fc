"""The training console without the libraries' noise: what train.py prints is the run's own story.

Dropped (they repeat on every run and say nothing about it): Lightning's adverts ("💡 Tip: ... litlogger"),
its line for a ``limit_*_batches`` of 1.0 (every batch, the default behaviour), and torch's deprecation of
``LeafSpec`` that Lightning triggers. Lightning's other messages (a ``limit_*_batches`` that really limits,
the accelerator in use) and every warning about the run itself stay.
"""

from __future__ import annotations

import logging
import re
import warnings

_DROPPED = re.compile(r"^💡 Tip: |was configured so 100% of the batches")
_LIGHTNING_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _DROPPED.search(record.getMessage())


_FILTER = _DropNoise()


def quiet_library_noise() -> None:
    """Install the filters (idempotent): on Lightning's rank-zero loggers and on Python's warnings."""
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated", category=DeprecationWarning)
