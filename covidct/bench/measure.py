"""What every benchmark row shares: timing (:func:`timed`, :func:`best_of`), this process's peak RSS since a
reset (:func:`reset_peak_rss`, :func:`peak_rss_mib`), the A-vs-B :class:`Row` of ``make bench`` and its text
table, and the backbone check of both command lines. Imports nothing heavy."""

from __future__ import annotations

import re
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from covidct.errors import ConfigError
from covidct.text_table import format_table


@dataclass
class Row:
    """One comparison: ``a`` vs ``b`` (same unit); ratio = a / b; ``ok`` is None without a target."""

    name: str
    data: str
    a_label: str
    a: float
    b_label: str
    b: float
    unit: str
    target: str = ""
    ok: bool | None = None

    @property
    def ratio(self) -> float:
        """a / b (nan when b is 0)."""
        return self.a / self.b if self.b else float("nan")


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn()`` took (wall clock)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    """The fewest seconds ``fn()`` took in ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux: ``5`` into ``/proc/self/clear_refs``, which
    resets ``VmHWM`` and ``ru_maxrss``); False where it cannot be (the peak is then the process's since it
    started)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    """This process's peak resident set size (MiB) since it started or since :func:`reset_peak_rss`; its
    child processes (DataLoader or cache workers) are not in it."""
    try:
        with open("/proc/self/status") as f:
            found = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
        if found:
            return int(found.group(1)) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def check_backbone(key: str, name: str) -> None:
    """A ConfigError naming ``key`` unless ``name`` is a known backbone (before any data is read)."""
    from covidct.models.backbones import BACKBONES

    if name not in BACKBONES:
        raise ConfigError(f"{key}={name!r} is not known; choose one of {sorted(BACKBONES)}")


def format_rows(rows: list[Row]) -> str:
    """The rows as a text table (A and B, their ratio, the target and whether it was met)."""
    header = ["row", "data", "A", "value A", "B", "value B", "unit", "A/B", "target", "met"]
    cells = [header] + [
        [
            r.name,
            r.data,
            r.a_label,
            f"{r.a:.4g}",
            r.b_label,
            f"{r.b:.4g}",
            r.unit,
            f"{r.ratio:.3g}x",
            r.target,
            "" if r.ok is None else ("yes" if r.ok else "NO"),
        ]
        for r in rows
    ]
    return format_table(cells[0], cells[1:])
