"""matplotlib for report PNGs: the one place that picks the Agg backend (files only, no display)."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use (reports only)."""
    import matplotlib  # heavy: matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib

    return plt
