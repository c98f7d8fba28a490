"""Retention over an edit sequence: a curve of the metrics (x = edits applied) and its plot.

A curve is a list of points `{"edits": n, <metric>: value, ...}`, one per evaluation of the
requests edited so far (see `KDPOEditor`'s `eval_every_n_edits`).
"""
from __future__ import annotations

import os
from pathlib import Path

from .saving import atomic_write


def plotted_keys(curve: list[dict]) -> list[str]:
    """The curve's metrics on the 0-100 scale: main metrics and capability, not per-kind ones or fluency."""
    keys = dict.fromkeys(k for point in curve for k in point)
    return [k for k in keys if k not in ("edits", "fluency") and ("/" not in k or k.startswith("capability/"))]


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


class Retention:
    """What an edit sequence keeps: each request's Edit Succ. right after its own edit, a curve of every
    metric over the requests edited so far every `every` edits, and general capability (multiple
    choice) before the first edit, on the curve and at the end."""

    def __init__(self, every: int | None, questions: dict[str, list], batch_size: int = 16) -> None:
        if every is not None and every < 1:
            raise ValueError(f"eval_every_n_edits must be at least 1, got {every}")
        self.every, self.questions, self.batch_size = every, questions, batch_size
        self.curve: list[dict] = []
        self.right_after: dict[int, float] = {}
        self.capability_before: dict[str, float] = {}
        self._latest: tuple[int, list[dict]] = (0, [])  # (edits applied, rows) of the last curve evaluation

    def capability(self, model, tokenizer) -> dict[str, float]:
        """{"capability/<benchmark>/<acc|acc_norm>": x100} on the current model."""
        from .capability import score

        return {f"capability/{name}/{metric}": value for name, qs in self.questions.items()
                for metric, value in score(model, tokenizer, name, qs, self.batch_size).items()}

    def after_edit(self, model, tokenizer, evaluator, index: int, edited: list[int]) -> dict | None:
        """Record request `index`'s Edit Succ. now; every `every` edits, evaluate all `edited`
        requests and return the new curve point."""
        if self.every is None:
            return None
        self.right_after[index] = evaluator.edit_success(model, [index])[0]
        if len(edited) % self.every:
            return None
        rows = evaluator.evaluate(model, edited)
        self._latest = (len(edited), rows)
        summary = evaluator.summarize(rows)
        return self.add_point(len(edited), {**summary, **self.capability(model, tokenizer)})

    def rows_after(self, edits: int) -> list[dict] | None:
        """The rows of the curve point at `edits` edits if it is the last one evaluated in this process:
        the after-all evaluation of the same model need not run again."""
        return self._latest[1] if self._latest[0] == edits else None

    def add_point(self, edits: int, summary: dict) -> dict:
        point = {"edits": edits, **{k: v for k, v in summary.items() if k != "edits_succeeded"}}
        self.curve.append(point)
        return point

    def state_dict(self) -> dict:
        return {"curve": self.curve, "right_after": self.right_after, "capability_before": self.capability_before}

    def load_state_dict(self, state: dict) -> None:
        self.curve, self.capability_before = state["curve"], state["capability_before"]
        self.right_after = {int(k): v for k, v in state["right_after"].items()}
