"""The one Markdown table writer (GitHub pipe tables) for reports and the README's result tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def fmt(value: object, digits: int = 4) -> str:
    """A cell: integers as such, floats to `digits` places (tiny ones in significant digits), NaN as n/a."""
    if value is pd.NA or value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def markdown_table(df: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub pipe table (pandas' to_markdown needs tabulate, which we do not depend on)."""
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v, digits) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"
