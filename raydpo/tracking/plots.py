"""The charts raydpo draws: reward curves of a run, and a search's trials in (beta, lr).

matplotlib is imported lazily and used without pyplot (a bare ``Figure`` on the Agg canvas).
"""

from __future__ import annotations

import io
import math

from raydpo.metric_names import LOSS, REWARDS_ACCURACIES, REWARDS_CHOSEN, REWARDS_MARGINS, REWARDS_REJECTED
from raydpo.tracking.trials import TrialRow

PLOT_KEYS = (LOSS, REWARDS_CHOSEN, REWARDS_REJECTED, REWARDS_MARGINS, REWARDS_ACCURACIES)


def figure(size: tuple[float, float]):
    """A bare Figure on the Agg canvas, no pyplot: no process-wide backend switch (a notebook
    calling this keeps its inline backend) and no global figure registry to leak into."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, dpi=80, format="png")
    return buf.getvalue()


def plot_reward_curves(history: list[dict[str, float]], path: str) -> str:
    """PNG of loss and DPO reward curves (train line, eval markers) over steps, one panel per
    quantity that was logged: an SFT run (loss only) gets a single loss panel, an empty history
    an empty loss panel -- always a valid picture."""
    logged = {k for h in history for k in h}
    keys = [k for k in PLOT_KEYS if f"train/{k}" in logged or f"eval/{k}" in logged] or ["loss"]
    fig = figure((4 * len(keys), 3.2))
    axes = fig.subplots(1, len(keys), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for split, style in (("train", "-"), ("eval", "o--")):
            pts = [(h["step"], h[f"{split}/{key}"]) for h in history if f"{split}/{key}" in h]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, label=split)
        ax.set_title(key)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")
    return str(path)


def trials_scatter(rows: list[TrialRow], metric: str, best: TrialRow | None) -> bytes | None:
    """PNG of the trials in (beta, lr), coloured by ``metric``, the best one ringed; None when no
    trial has both values."""
    pts = [r for r in rows if not (math.isnan(r.beta) or math.isnan(r.lr))]
    if not pts:
        return None
    vals = [r.score(metric) for r in pts]
    fig = figure((5.6, 4.0))
    ax = fig.subplots()
    sc = ax.scatter([r.beta for r in pts], [r.lr for r in pts], c=[v if not math.isnan(v) else 0.0 for v in vals],
                    cmap="viridis", s=80, edgecolors="k")
    if best is not None and any(r is best for r in pts):  # identity: NaN fields defeat ==
        ax.scatter([best.beta], [best.lr], s=260, facecolors="none", edgecolors="red", linewidths=2, label="best")
        ax.legend(fontsize=8, loc="best")
    if all(r.beta > 0 for r in pts):
        ax.set_xscale("log")
    if all(r.lr > 0 for r in pts):
        ax.set_yscale("log")
    ax.set_xlabel("beta")
    ax.set_ylabel("learning rate")
    ax.set_title(f"trials coloured by {metric}")
    fig.colorbar(sc, ax=ax, label=metric)
    fig.tight_layout()
    return png(fig)
