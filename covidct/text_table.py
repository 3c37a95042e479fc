"""One plain-text table formatter for every table covidct prints (vote rules, sweeps, bench)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def _is_number(cell: str) -> bool:
    try:
        float(cell.removesuffix("x"))  # bench ratios are written "1.05x"
    except ValueError:
        return False
    return True


def format_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """Aligned text: every column as wide as its widest cell, two spaces apart; a column whose cells
    are all numbers (or empty) is right-aligned, any other left-aligned; no trailing spaces. Cells are
    printed with ``str``: format numbers (decimals) before."""
    lines = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    numeric = [
        all(_is_number(line[i]) or line[i] == "" for line in lines[1:]) and len(lines) > 1 for i in range(len(widths))
    ]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if right else cell.ljust(w) for cell, w, right in zip(line, widths, numeric, strict=True)
        ).rstrip()
        for line in lines
    )
