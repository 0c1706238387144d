"""Figures from leaderboard rows (and saved checkpoints) only: never by re-training.

`make_plots(task, out)` draws, for each study (one selection per figure: never a figure
pooled across studies, whose budgets and objectives differ), the generic figures every task
gets (optimisation history, parameter importances, learning curves of the top trials),
then calls the hooks the task registered with `@register_plots(task)`, each receiving a
`PlotInput` of that study's rows. A study's figures go to `<out>/<task>/plots/<study>/`.
Axes carry the metrics' units; error bars are mean +- std over seeds, and say so.

Figures are drawn on `matplotlib.figure.Figure` objects, never through pyplot: no GUI
backend is needed and nothing global (open figures, rcParams) outlives a call. A figure
that cannot be drawn is skipped with a warning naming it; the others are still written,
and only the paths actually written are returned.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench import leaderboard
from bench.registry import get_plots, get_task

DPI = 110
TOP_K_CURVES = 5
MIN_IMPORTANCE_TRIALS = 20  # fANOVA's forest on fewer points ranks noise


@dataclass
class PlotInput:
    task: str
    out: Path               # leaderboard root
    plot_dir: Path          # <out>/<task>/plots/<study>: write PNGs here
    rows: pd.DataFrame      # one study's trial rows, every state
    data_dir: Path | None   # for hooks that need test data (reconstructions, t-SNE)
    notes: list[str] = field(default_factory=list)  # what could not be drawn, and why

    @property
    def study(self) -> str:
        return str(self.rows["study"].iloc[0]) if not self.rows.empty else ""

    def note(self, text: str) -> None:
        self.notes.append(f"{self.study}: {text}")

    def curves(self, uids: list[str] | None = None) -> pd.DataFrame:
        """Long-format curve points (trial_uid, step, metric, value)."""
        return leaderboard.read_curves(self.out, self.task, uids)

    def artifact_dir(self, uid: str) -> Path:
        """The trial's artifact folder (checkpoints and the like)."""
        return self.out / self.task / "artifacts" / uid

    def complete(self) -> pd.DataFrame:
        return self.rows[self.rows["state"] == "COMPLETE"] if not self.rows.empty else self.rows


# ---------------------------------------------------------------- drawing helpers
def _rc() -> Any:
    import seaborn as sns

    return {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=0.8),
            "axes.formatter.useoffset": False}  # 9.5, 10, 10.5 on an axis, not "+1e1"


@contextmanager
def figure(path: Path, nrows: int = 1, ncols: int = 1,
           panel_in: tuple[float, float] = (4.2, 3.2)) -> Iterator[tuple[Any, np.ndarray]]:
    """A styled Figure with a 2-D array of axes, saved to `path` when the block ends."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_rc()):
        fig = Figure(figsize=(panel_in[0] * ncols, panel_in[1] * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
        yield fig, axes
        fig.savefig(path, dpi=DPI)


def guarded(name: str, draw: Callable[..., Sequence[Path]], *args: Any) -> list[Path]:
    """Run one figure; a failure skips that figure with a warning instead of the whole plot."""
    try:
        return [Path(p) for p in draw(*args) if Path(p).exists()]
    except Exception as exc:  # one broken figure must not cost the user all the others
        warnings.warn(f"bench plot: figure {name!r} skipped: {type(exc).__name__}: {exc}",
                      stacklevel=2)
        return []


def image_rows(path: Path, rows: Sequence[tuple[str, np.ndarray]], title: str,
               col_labels: Sequence[str] | None = None) -> Path:
    """One strip per row of images ([N, C, H, W] floats in [0, 1]), the label on its left."""
    import textwrap

    ncol = max(len(imgs) for _, imgs in rows)
    width_in = max(0.62 * ncol + 0.6, 4.0)
    title = "\n".join(textwrap.wrap(title, int(width_in * 11)))  # ~11 characters an inch
    with figure(path, len(rows), 1, panel_in=(width_in, 1.0)) as (fig, axes):
        for ax, (label, imgs) in zip(axes[:, 0], rows, strict=True):
            ax.imshow(_tile(imgs), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            ax.set_ylabel(label, rotation=0, ha="right", va="center")
        if col_labels:
            w = rows[0][1].shape[-1] + 1  # tile width incl. the gap
            axes[-1, 0].set_xticks([w * (i + 0.5) for i in range(len(col_labels))], col_labels,
                                   fontsize="small")
        fig.suptitle(title, fontsize="medium")
    return path


def integer_ticks(axis: Any) -> None:
    """Trial numbers and epochs are integers: no 0.5 ticks."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _tile(imgs: np.ndarray) -> np.ndarray:
    """[N, C, H, W] -> one [H, N*(W+1)] (or RGB) strip with 1-pixel white gaps."""
    imgs = np.clip(np.asarray(imgs, dtype=np.float32), 0.0, 1.0)
    n, c, h, w = imgs.shape
    strip = np.ones((h, n * (w + 1) - 1, c), dtype=np.float32)
    for i, img in enumerate(imgs):
        strip[:, i * (w + 1): i * (w + 1) + w] = img.transpose(1, 2, 0)
    return strip[..., 0] if c == 1 else strip


# ---------------------------------------------------------------- per-study facts
def config_labels(rows: pd.DataFrame) -> dict[str, str]:
    """config_hash -> 'k=v k=v' over the parameters that differ between configurations."""
    params = [c for c in rows.columns if c.startswith("param_")]
    firsts = rows.groupby("config_hash")[params].first()
    cols = [c for c in firsts.columns if firsts[c].astype(str).nunique() > 1]
    return {str(h): " ".join(f"{c.removeprefix('param_')}={r[c]:.3g}" if isinstance(r[c], float)
                             else f"{c.removeprefix('param_')}={r[c]}" for c in cols) or "all"
            for h, r in firsts.iterrows()}


def objective_of(rows: pd.DataFrame) -> str:
    """The metric the study optimised, as its rows record it."""
    return str(rows["metric"].dropna().iloc[0]) if rows["metric"].notna().any() else "objective"


def axis_label(task: str, metric: str) -> str:
    """`metric (unit)` from the task's declaration."""
    decl = get_task(task).metrics.get(metric)
    return decl.label(metric) if decl is not None else metric


def _direction(rows: pd.DataFrame) -> str:
    return str(rows["direction"].dropna().iloc[0]) if rows["direction"].notna().any() \
        else "minimize"


# ---------------------------------------------------------------- generic figures
def plot_history(inp: PlotInput) -> list[Path]:
    """Objective per trial number with the running best; pruned and failed trials marked."""
    if inp.rows.empty:
        return []
    path = inp.plot_dir / "history.png"
    with figure(path, panel_in=(6.0, 3.6)) as (fig, axes):
        _history_panel(axes[0, 0], inp.task, inp.rows.sort_values("trial_number"))
        fig.suptitle(f"{inp.task}, study {inp.study}: optimisation history")
    return [path]


def _history_panel(ax: Any, task: str, rows: pd.DataFrame) -> None:
    done = rows[(rows["state"] == "COMPLETE") & rows["objective"].notna()]
    pruned = rows[(rows["state"] == "PRUNED") & rows["objective"].notna()]
    failed = rows[rows["state"] == "FAIL"]
    if not done.empty:
        ax.scatter(done["trial_number"], done["objective"], s=22, color="C0", label="complete")
        best = done["objective"].cummax() if _direction(rows) == "maximize" \
            else done["objective"].cummin()
        ax.step(done["trial_number"], best, where="post", color="C3", label="running best")
    if not pruned.empty:  # the last value a pruned trial reported
        ax.scatter(pruned["trial_number"], pruned["objective"], s=22, marker="x", color="0.5",
                   label="pruned (last report)")
    if not failed.empty:  # no objective: a marker along the bottom edge, above the axis
        ax.scatter(failed["trial_number"], np.full(len(failed), 0.03), marker="v", s=36,
                   color="C1", transform=ax.get_xaxis_transform(), clip_on=False, zorder=5,
                   label="failed (no objective)")
    numbers = rows["trial_number"].dropna()
    if len(numbers):  # every trial on the axis, the failed ones too (drawn in axes units,
        lo, hi = float(numbers.min()), float(numbers.max())  # they do not widen it)
        pad = max(0.5, 0.04 * (hi - lo))
        ax.set_xlim(lo - pad, hi + pad)
    if done.empty and pruned.empty:  # no objective to draw: no value axis to read
        ax.set_yticks([])
    counts = rows["state"].value_counts()
    ax.set_title(", ".join(f"{counts.get(s, 0)} {s.lower()}" for s in leaderboard.STATES))
    ax.set_xlabel("trial number")
    integer_ticks(ax.xaxis)
    metric = objective_of(rows)
    ax.set_ylabel(f"{axis_label(task, metric)}, {_direction(rows)}d")
    ax.legend(loc="best", fontsize="small")


def plot_importances(inp: PlotInput) -> list[Path]:
    """fANOVA importances of the searched parameters, from an in-memory Optuna study of the
    study's rows; only with MIN_IMPORTANCE_TRIALS complete trials (a note otherwise)."""
    done = inp.complete()
    searched = _space_params(inp.task, str(inp.rows["variant"].iloc[0])) if len(done) else {}
    if not searched:
        return []
    if len(done) < MIN_IMPORTANCE_TRIALS:
        inp.note(f"parameter importances need {MIN_IMPORTANCE_TRIALS} complete trials, the "
                 f"study has {len(done)}: not drawn")
        return []
    imp = importances(inp.task, done)
    if not imp:
        return []
    path = inp.plot_dir / "importances.png"
    with figure(path, panel_in=(5.0, 1.4 + 0.4 * len(imp))) as (fig, axes):
        ax = axes[0, 0]
        names = list(imp)[::-1]  # largest at the top of a barh
        bars = ax.barh(names, [imp[n] for n in names], color="C0", height=0.6)
        ax.bar_label(bars, fmt="%.2f", padding=2)
        ax.set_xlim(0, 1)
        ax.set_xlabel("importance (fANOVA, sums to 1)")
        ax.set_title(f"{inp.study}: {len(done)} complete trials", fontsize="medium")
        fig.suptitle(f"{inp.task}: parameter importances")
    return [path]


def importances(task: str, rows: pd.DataFrame,
                min_trials: int = MIN_IMPORTANCE_TRIALS) -> dict[str, float]:
    """{param: importance} over the searched parameters; empty with fewer than `min_trials`
    complete trials or nothing varying. `rows`: one study's COMPLETE rows."""
    import optuna

    rows = rows[rows["objective"].notna()]
    if len(rows) < min_trials or rows["objective"].nunique() < 2:
        return {}  # fANOVA cannot split a constant objective ("zero total variance")
    dists = _distributions(task, rows)
    if not dists:
        return {}
    trials = [optuna.trial.create_trial(
        value=float(r["objective"]), distributions=dists,
        params={n: _native(r[f"param_{n}"], d) for n, d in dists.items()})
        for _, r in rows.iterrows()]
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory"
    try:
        study = optuna.create_study(
            direction="maximize" if _direction(rows) == "maximize" else "minimize")
        study.add_trials(trials)
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    finally:
        optuna.logging.set_verbosity(verbosity)


def _distributions(task: str, rows: pd.DataFrame) -> dict[str, Any]:
    """Distributions of the parameters that vary (and are never missing) in these rows.

    The search space's own distribution is used where it holds every value; a grid
    variant's values (beta=0 outside a log range, say) get one inferred from the data.
    """
    space = _space_params(task, rows["variant"].iloc[0])
    out = {}
    for name in space:  # searched parameters only: fixed --set keys are not candidates
        col = f"param_{name}"
        values = rows[col] if col in rows else pd.Series(dtype=float)
        if values.empty or values.isna().any() or values.astype(str).nunique() < 2:
            continue
        dist = space.get(name)
        if dist is None or not _contains(dist, values):
            dist = _inferred(values)
        out[name] = dist
    return out


def _space_params(task: str, variant: str | None) -> dict[str, Any]:
    from bench.space import space_for

    try:
        space = space_for(task)
    except Exception:  # an unreadable space: every distribution is inferred
        return {}
    v = space.variants.get(str(variant)) if variant else None
    if v is not None and v.enumerated:
        return {}  # a grid is not a search: nothing to attribute importance to
    params = v.params if v is not None and v.params else space.params
    return {n: p.to_optuna() for n, p in params.items()}


def _contains(dist: Any, values: pd.Series) -> bool:
    try:
        return all(dist._contains(dist.to_internal_repr(_native(v, dist))) for v in values)
    except (ValueError, TypeError):
        return False


def _inferred(values: pd.Series) -> Any:
    from optuna import distributions as d

    if pd.api.types.is_integer_dtype(values):
        return d.IntDistribution(int(values.min()), int(values.max()))
    if pd.api.types.is_numeric_dtype(values):
        return d.FloatDistribution(float(values.min()), float(values.max()))
    return d.CategoricalDistribution(sorted({str(v) for v in values}))


def _native(value: Any, dist: Any) -> Any:
    """numpy scalars -> the Python type the distribution expects."""
    from optuna import distributions as d

    if isinstance(dist, d.IntDistribution):
        return int(value)
    if isinstance(dist, d.FloatDistribution):
        return float(value)
    value = value.item() if hasattr(value, "item") else value
    return value if value in dist.choices else str(value)  # inferred choices are strings


def plot_curves(inp: PlotInput) -> list[Path]:
    """The objective per epoch for the study's top-k complete trials."""
    done = inp.complete()
    if done.empty:
        return []
    metric = objective_of(done)
    top = done[done["objective"].notna()].sort_values(
        "objective", ascending=_direction(done) == "minimize").head(TOP_K_CURVES)
    pts = inp.curves(list(top["trial_uid"]))
    pts = pts[pts["metric"] == metric] if not pts.empty else pts
    if pts.empty:
        return []
    if pts["step"].nunique() < 2:
        inp.note(f"learning curves need 2 or more reported epochs of {metric}, the trials "
                 "reported one: not drawn")
        return []
    path = inp.plot_dir / "curves.png"
    with figure(path, panel_in=(6.0, 3.6)) as (fig, axes):
        ax = axes[0, 0]
        for i, (_, row) in enumerate(top.iterrows()):
            mine = pts[pts["trial_uid"] == row["trial_uid"]].sort_values("step")
            if not mine.empty:
                ax.plot(mine["step"] + 1, mine["value"], marker="o", ms=3, color=f"C{i}",
                        label=f"#{row['trial_number']}: {row['objective']:.4g}")
        ax.set_xlabel("epoch")
        integer_ticks(ax.xaxis)
        ax.set_ylabel(axis_label(inp.task, metric))
        ax.legend(title="trial: final", fontsize="small")
        fig.suptitle(f"{inp.task}, study {inp.study}: learning curves of the top "
                     f"{len(top)} trials")
    return [path]


GENERIC: list[tuple[str, Callable[[PlotInput], list[Path]]]] = [
    ("history", plot_history), ("importances", plot_importances), ("curves", plot_curves)]


@dataclass
class PlotResult:
    paths: list[Path]
    notes: list[str]
    no_rows: bool = False  # the leaderboard holds no trial of the selection


def study_folder(study: str, uid: str, several: bool) -> str:
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", study).lstrip(".") or "study"
    return f"{name}-{uid[:6]}" if several and uid else name


def make_plots(task: str, out: str | Path, study: str | None = None, variant: str | None = None,
               data_dir: str | Path | None = None) -> PlotResult:
    """Every figure of each selected study, under <out>/<task>/plots/<study>/.

    An unknown study or variant is an error naming the known ones (ConfigError)."""
    from bench.board import check_selection, filter_rows

    get_task(task)
    out = Path(out)
    rows = leaderboard.read_trials(out, task)
    check_selection(rows, task, study, variant)
    rows = filter_rows(rows, study, variant)
    result = PlotResult([], [])
    if rows.empty:
        result.notes.append(f"no trials of {task!r} under {out}: nothing to plot "
                            f"(`bench run {task} --out {out}` adds some)")
        result.no_rows = True
        return result
    uids = rows["study_uid"].fillna("") if "study_uid" in rows else ""
    rows = rows.assign(study_uid=uids)
    for (name, uid), g in rows.groupby(["study", "study_uid"], sort=True):
        several = rows.loc[rows["study"] == name, "study_uid"].nunique() > 1
        plot_dir = out / task / "plots" / study_folder(str(name), str(uid), several)
        plot_dir.mkdir(parents=True, exist_ok=True)
        inp = PlotInput(task, out, plot_dir, g.reset_index(drop=True),
                        Path(data_dir) if data_dir else None, result.notes)
        for fig_name, draw in GENERIC:
            result.paths.extend(guarded(fig_name, draw, inp))
        for hook in get_plots(task):
            result.paths.extend(guarded(getattr(hook, "__name__", "hook"), hook, inp))
    return result
