"""Numbers for people: one way to print a latency everywhere (tables, status, reports)."""

from __future__ import annotations

import math


def fmt_ms(x: float | None) -> str:
    """A latency given in ms: in µs below 1 ms (``0.001 ms`` says nothing), 3 significant digits; ``-`` for none."""
    if x is None or math.isnan(x):
        return "-"
    if x < 1:
        return f"{x * 1000:.3g} µs"
    return f"{x:.3g} ms" if x < 100 else f"{x:.0f} ms"


def log_axis(ax) -> None:  # noqa: ANN001 (a matplotlib Axes; matplotlib is imported lazily)
    """A log y axis labelled 0.5, 1, 2, 5 … (not 5×10⁻¹): for a plot where a few values are far above the rest."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
