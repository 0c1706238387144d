"""Figures from leaderboard rows (and saved checkpoints) only: never by re-training.

`make_plots(task, out)` draws the generic figures every task gets (optimisation history,
parameter importances, learning curves of the top trials), then calls the hooks the task
registered with `@register_plots(task)`, each receiving a `PlotInput`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench import leaderboard
from bench.registry import get_plots, get_task


@dataclass
class PlotInput:
    task: str
    out: Path               # leaderboard root
    plot_dir: Path          # <out>/<task>/plots: write PNGs here
    rows: pd.DataFrame      # trial rows of every state, filtered by study / variant
    data_dir: Path | None   # for hooks that need test data (reconstructions, t-SNE)

    def curves(self, uids: list[str] | None = None) -> pd.DataFrame:
        """Long-format curve points (trial_uid, step, metric, value)."""
        return leaderboard.read_curves(self.out, self.task, uids)

    def artifact_dir(self, uid: str) -> Path:
        """The trial's artifact folder (checkpoints and the like)."""
        return self.out / self.task / "artifacts" / uid

    def complete(self) -> pd.DataFrame:
        return self.rows[self.rows["state"] == "COMPLETE"] if not self.rows.empty else self.rows


def make_plots(task: str, out: str | Path, study: str | None = None, variant: str | None = None,
               data_dir: str | Path | None = None) -> list[Path]:
    get_task(task)
    out = Path(out)
    rows = leaderboard.read_trials(out, task, study, variant)
    plot_dir = out / task / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    inp = PlotInput(task, out, plot_dir, rows, Path(data_dir) if data_dir else None)
    paths: list[Path] = []
    for hook in get_plots(task):
        paths.extend(hook(inp))
    return paths
