"""Atomic file output: a reader never sees a half-written file, even after a crash."""

from __future__ import annotations

import csv
import io
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

from covidct.errors import DataError


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` (e.g. an encoded PNG) atomically: temporary file beside ``path``, fsync, rename."""
    return atomic_write_with(path, lambda f: f.write(data))


def atomic_write_with(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Let ``write`` fill a temporary binary file beside ``path`` (e.g. ``torch.save(obj, f)``), fsync it, then
    rename it over ``path``: readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def create_exclusive(path: str | Path, text: str, replace: bool = False) -> Path:
    """Create ``path`` holding ``text``; FileExistsError if it exists, unless ``replace`` (then written
    atomically). Of two processes creating it at once, exactly one succeeds: a claim on its folder."""
    path = Path(path)
    if replace:
        return atomic_write_text(path, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


#: first characters that make a spreadsheet read a cell as a formula (OWASP "CSV injection"); and the quote
#: that neutralises them, so that a cell starting with it is quoted too (:func:`csv_text` is then reversible)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")
#: a decimal number as text ("-0.5", "+1e-3"): a spreadsheet reads it as a number, not a formula
NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def csv_cell(value: object) -> object:
    """``value`` as a CSV cell that no spreadsheet runs: text starting with ``= + - @``, a tab or a carriage
    return (a patient folder named ``=HYPERLINK(...)``) gets a leading ``'``, as does text starting with
    ``'``. Numbers, and text that is a decimal number (``-123.4``), are kept as they are."""
    if not isinstance(value, str) or not value.startswith(FORMULA_STARTS) or NUMBER.fullmatch(value):
        return value
    return "'" + value


def csv_text(cell: str) -> str:
    """The text that :func:`csv_cell` wrote as ``cell`` (for readers of these CSVs, e.g. a patient id)."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(FORMULA_STARTS) else cell


def atomic_write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> Path:
    """Write a CSV (header + rows) atomically, every text cell through :func:`csv_cell`. A row with a carriage
    return in a cell is written with every cell quoted: unquoted (the writer quotes only what is in its line
    terminator, ``\\n``), a reader would end the row there."""
    buf = io.StringIO()
    plain = csv.writer(buf, lineterminator="\n")
    quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    for row in [header, *rows]:
        cells = [csv_cell(cell) for cell in row]
        (quoted if any(isinstance(cell, str) and "\r" in cell for cell in cells) else plain).writerow(cells)
    return atomic_write_text(path, buf.getvalue())


def require_file(path: Path, key: str, hint: str) -> None:
    """DataError ``<key>=<path>: file not found (<hint>).`` (or ``a folder, not a file``) unless ``path`` is a
    file: the config key that named it, and where such files are."""
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "file not found"
        raise DataError(f"{key}={path}: {what} ({hint}).")


FAILED_SUFFIX = "-failed"


def made_by_this_run(folder: str | Path) -> bool:
    """Whether ``folder`` holds nothing yet but what Hydra put there as this run started (``.hydra/`` and the
    job's ``.log``), or does not exist: a folder that :func:`mark_failed` may rename if the run fails. Call it
    before the run writes anything; a folder reused by a resume or chosen by hand holds more and is left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return True
    return all(p.name == ".hydra" or (p.suffix == ".log" and p.is_file()) for p in folder.iterdir())


def mark_failed(folder: str | Path) -> Path:
    """Rename a failed run's ``folder`` to ``<folder>-failed`` (``-failed-2``, ... when taken), so that a listing
    (or ``ls -t runs/*/checkpoints``) cannot take it for a result; nothing in it is deleted. Returns the new
    path, or ``folder`` itself when it does not exist or cannot be renamed."""
    folder = Path(folder)
    if not folder.is_dir() or folder.name.endswith(FAILED_SUFFIX):
        return folder
    for n in range(1, 100):
        target = folder.with_name(folder.name + FAILED_SUFFIX + (f"-{n}" if n > 1 else ""))
        if not target.exists():
            try:
                folder.rename(target)  # open files (the run's log) keep being written, under the new name
            except OSError:
                return folder
            return target
    return folder
