"""Retention over an edit sequence: a curve of the metrics (x = edits applied) and its plot.

A curve is a list of points `{"edits": n, <metric>: value, ...}`, one per evaluation of the
requests edited so far (see `callbacks.RetentionCurve`).
"""
from __future__ import annotations

import os
from pathlib import Path

from .saving import atomic_write


def plotted_keys(curve: list[dict]) -> list[str]:
    """The curve's metrics on the 0-100 scale: main metrics and capability; not per-kind ones, fluency, or the
    pre-edit scores (constant along the curve)."""
    keys = dict.fromkeys(k for point in curve for k, v in point.items() if isinstance(v, (int, float)))
    return [k for k in keys if k not in ("edits", "fluency") and not k.startswith("pre_")
            and ("/" not in k or k.startswith("capability/"))]


def plot_curve(curve: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Write a PNG of every plotted metric against the number of edits applied."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5))
    axes = figure.add_subplot()
    x = [point["edits"] for point in curve]
    palette = colormaps["tab20"].colors
    for i, key in enumerate(plotted_keys(curve)):  # teacher-forced solid, generated dashed, capability dotted
        style = ":" if key.startswith("capability/") else "--" if key.startswith("gen_") else "-"
        axes.plot(x, [point.get(key) for point in curve], style, marker="o", color=palette[i % 20], label=key)
    axes.set(xlabel="edits applied", ylabel="score (x100)", ylim=(0, 100), title=title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    with atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return Path(path)
