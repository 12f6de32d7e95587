"""The accuracy budget's search, drawn: per task, selection accuracy against sparsity, the
budget's floor and the chosen point (what users would rather look at than read)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from seap.io import atomic_write_bytes


def budget_plot(record: dict[str, Any], path: str | Path) -> Path:
    """One panel per task of ``record`` (the budget stage's ``budget.json``): the candidates'
    selection accuracy against sparsity (dense at 0), the floor ``dense - allowed`` dashed and
    the chosen sparsity ringed; with a general mask under the same budget, its curve on the task
    (gray) and its chosen sparsity (dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = record["tasks"]
    cols = min(3, max(len(tasks), 1))
    rows = math.ceil(len(tasks) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), dpi=120, squeeze=False)
    for ax, (task, entry) in zip(axes.flat, tasks.items()):
        points = sorted((float(s), a) for s, a in entry["curve"].items())
        xs = [0.0] + [s * 100 for s, _ in points]
        ys = [entry["dense"] * 100] + [a * 100 for _, a in points]
        ax.plot(xs, ys, marker="o", markersize=3, label="own expert")
        general = record.get("general")
        if general and task in general["curves"]:  # the general mask's curve and its chosen sparsity
            points_g = sorted((float(s), a) for s, a in general["curves"][task].items())
            ax.plot([0.0] + [s * 100 for s, _ in points_g], [entry["dense"] * 100] + [a * 100 for _, a in points_g],
                    marker=".", markersize=2, color="gray", linewidth=1, label="general mask")
            ax.axvline(general["chosen"] * 100, color="gray", linestyle=":", linewidth=1)
            ax.legend(fontsize=6)
        if entry.get("allowed_drop") is not None:  # (none with a speed target alone)
            ax.axhline((entry["dense"] - entry["allowed_drop"]) * 100, color="gray", linestyle="--", linewidth=1)
        chosen = entry["chosen"]
        at = entry["dense"] if chosen == 0 else dict(points).get(chosen, entry["dense"])
        ax.plot([chosen * 100], [at * 100], marker="o", markersize=10, fillstyle="none", color="crimson")
        ax.set_title(f"{task}: {chosen * 100:g}%", fontsize=9)
        ax.set_xlabel("sparsity (%)", fontsize=8)
        ax.set_ylabel("selection accuracy (%)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    budget = (f"max drop {record['max_drop']:g} points" if record.get("max_drop") is not None
              else f"max drop {record['max_drop_rel']:g} of the margin over chance"
              if record.get("max_drop_rel") is not None else "no accuracy budget")
    if record.get("min_speedup") is not None:
        budget += f", prefill speed-up at least {record['min_speedup']:g}x"
    fig.suptitle(f"accuracy budget: {budget} (dashed: the floor; ringed: chosen)", fontsize=9)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


__all__ = ["budget_plot"]
