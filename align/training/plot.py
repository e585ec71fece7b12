"""Metric plots (PNG), drawn in a child process: ``python -m align.training.plot < job.json``.

``align.training.tracking.plot_metrics`` starts it so that matplotlib (~25 MB once imported) never
enters a trainer's process; this module imports nothing heavy besides matplotlib.
"""

from __future__ import annotations

import json
import sys


def draw(series: dict[str, list], path: str, title: str, x_label: str = "step") -> None:
    """One panel per key (points are (x, value), x the step unless ``x_label`` says otherwise),
    written with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.5), squeeze=False)
    for ax, (key, points) in zip(axes[0], series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if x_label != "step" else None)
        ax.set_xlabel(x_label)
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    draw(**json.load(sys.stdin))
