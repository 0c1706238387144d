"""`bench compare`: is a difference between configurations real, at the budget that was run?

For each configuration against the best (by the metric's direction), paired by seed:
the mean difference with a bootstrap 95% confidence interval, a paired test (Wilcoxon's
signed-rank test from 6 pairs on, a paired t-test below that, where the signed-rank test
cannot reach p < 0.05; the table says which), and Holm-adjusted p-values across the
comparisons. For three or more configurations over the same seeds: Friedman's test and a
critical-difference diagram (Demsar 2006; Nemenyi's critical difference on average ranks).
The statistics are scipy's; only Holm's step-down adjustment is written out here.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import ConfigError

WILCOXON_MIN_PAIRS = 6  # below this the exact signed-rank test cannot reach p < 0.05
BOOTSTRAP_RESAMPLES = 9999
ALPHA = 0.05


@dataclass
class Comparison:
    config: str  # a readable label of the configuration
    config_hash: str
    mean: float
    n: int
    pairs: int  # seeds shared with the best
    diff: float | None  # mean of (this - best) over the shared seeds
    ci_low: float | None
    ci_high: float | None
    test: str  # "wilcoxon", "paired t", or "-" (fewer than 2 pairs)
    p: float | None
    p_holm: float | None = None
    significant: bool | None = None


@dataclass
class Result:
    metric: str
    direction: str
    best: str
    comparisons: list[Comparison]
    friedman_p: float | None
    friedman_blocks: int
    average_ranks: dict[str, float]
    critical_difference: float | None


def label(row: pd.Series, params: list[str]) -> str:
    parts = [f"{p.removeprefix('param_')}={_short(row[p])}" for p in params]
    return ", ".join(parts) or str(row.get("study", "all"))


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def by_seed(rows: pd.DataFrame, metric: str, key: str = "config") -> pd.DataFrame:
    """config x seed table of the metric (COMPLETE rows; a repeated seed is averaged)."""
    col = "objective" if metric == "objective" else f"metric_{metric}"
    done = rows[(rows["state"] == "COMPLETE") & rows[col].notna()]
    return done.pivot_table(index=key, columns="seed", values=col, aggfunc="mean")


def holm(p: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the input order."""
    order = np.argsort(p)
    m, running, out = len(p), 0.0, [0.0] * len(p)
    for i, idx in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[idx]))
        out[idx] = running
    return out


def paired(d: np.ndarray, seed: int = 0) -> tuple[float, float | None, float | None, str,
                                                   float | None]:
    """(mean diff, CI low, CI high, test name, p) of paired differences `d`."""
    from scipy import stats

    mean = float(d.mean())
    if len(d) < 2:
        return mean, None, None, "-", None
    if np.allclose(d, d[0]):  # no spread: every test is undefined, not significant
        return mean, mean, mean, "none (no spread)", None
    ci = stats.bootstrap((d,), np.mean, confidence_level=0.95, method="percentile",
                         n_resamples=BOOTSTRAP_RESAMPLES, rng=np.random.default_rng(seed))
    low, high = float(ci.confidence_interval.low), float(ci.confidence_interval.high)
    if len(d) >= WILCOXON_MIN_PAIRS:
        return mean, low, high, "wilcoxon", float(stats.wilcoxon(d).pvalue)
    return mean, low, high, "paired t", float(stats.ttest_1samp(d, 0.0).pvalue)


def compare(rows: pd.DataFrame, metric: str, direction: str, params: list[str]) -> Result:
    """Every configuration of `rows` against the best one (see the module docstring)."""
    rows = rows.copy()
    rows["config"] = [label(r, params) for _, r in rows.iterrows()]
    table = by_seed(rows, metric)
    if table.empty:
        complete = int((rows["state"] == "COMPLETE").sum()) if "state" in rows else 0
        states = ", ".join(f"{n} {s}" for s, n in rows["state"].value_counts().items()) \
            if "state" in rows else "no rows"
        hint = ("`bench eval` adds the test metrics" if metric.startswith("test_") else
                f"the study has {states}")
        raise ConfigError(f"no COMPLETE trial has the metric {metric!r} ({complete} COMPLETE); "
                          f"{hint}")
    means = table.mean(axis=1)
    best = means.idxmax() if direction == "maximize" else means.idxmin()
    hashes = rows.groupby("config")["config_hash"].first()
    comps = []
    for cfg in means.sort_values(ascending=direction == "minimize").index:
        if cfg == best:
            continue
        both = table.loc[[cfg, best]].dropna(axis=1)
        d = (both.loc[cfg] - both.loc[best]).to_numpy(float)
        diff, low, high, test, p = paired(d) if len(d) else (None, None, None, "-", None)
        comps.append(Comparison(cfg, str(hashes[cfg]), float(means[cfg]),
                                int(table.loc[cfg].notna().sum()), len(d), diff, low, high,
                                test, p))
    tested = [c for c in comps if c.p is not None]
    for c, adj in zip(tested, holm([c.p for c in tested if c.p is not None]), strict=True):
        c.p_holm, c.significant = adj, adj < ALPHA
    friedman_p, blocks, ranks, cd = friedman(table, direction)
    return Result(metric, direction, str(best), comps, friedman_p, blocks, ranks, cd)


def friedman(table: pd.DataFrame, direction: str) -> tuple[float | None, int, dict[str, float],
                                                           float | None]:
    """Friedman's test over the seeds every configuration has; average ranks (1 = best) and
    Nemenyi's critical difference at alpha 0.05."""
    from scipy import stats

    full = table.dropna(axis=1)
    k, n = full.shape
    if k < 3 or n < 2:
        return None, n, {}, None
    values = full.to_numpy(float)
    p = float(stats.friedmanchisquare(*values).pvalue)
    signed = -values if direction == "maximize" else values
    ranks = stats.rankdata(signed, axis=0).mean(axis=1)
    q = float(stats.studentized_range.ppf(1 - ALPHA, k, np.inf)) / math.sqrt(2)
    cd = q * math.sqrt(k * (k + 1) / (6.0 * n))
    return p, n, dict(zip(full.index.astype(str), map(float, ranks), strict=True)), cd


# ---------------------------------------------------------------- output
def _f(x: float | None, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def frame(res: Result) -> pd.DataFrame:
    return pd.DataFrame([{
        "configuration": c.config, "mean": _f(c.mean), "n": c.n, "pairs": c.pairs,
        f"diff vs best ({res.metric})": _f(c.diff),
        "95% CI (bootstrap)": "-" if c.ci_low is None else f"[{_f(c.ci_low)}, {_f(c.ci_high)}]",
        "test": c.test, "p": _f(c.p, 3), "p (Holm)": _f(c.p_holm, 3),
        "different": "-" if c.significant is None else ("yes" if c.significant else "no"),
    } for c in res.comparisons])


def render(res: Result, fmt: str = "table", title: str = "") -> str:
    if fmt == "json":
        return json.dumps({**asdict(res), "title": title}, indent=2)
    head = (f"{title}\nbest: {res.best} ({res.direction} {res.metric}); each configuration "
            "against it, paired by seed")
    body = frame(res)
    text = body.to_markdown(index=False) if fmt == "markdown" else body.to_string(index=False)
    tail = []
    if res.friedman_p is not None:
        ranks = ", ".join(f"{k}: {v:.2f}" for k, v in sorted(res.average_ranks.items(),
                                                              key=lambda kv: kv[1]))
        tail.append(f"Friedman over {res.friedman_blocks} shared seeds: p = "
                    f"{res.friedman_p:.3g}; average ranks (1 = best): {ranks}; Nemenyi "
                    f"critical difference {res.critical_difference:.2f}")
    return "\n".join([head, text, *tail]) if len(body) else head + "\n(one configuration)"


def cd_diagram(res: Result, path: Path, title: str = "") -> Path | None:
    """Demsar's critical-difference diagram: average ranks on an axis, configurations whose
    ranks differ by less than the critical difference joined by a bar."""
    if not res.average_ranks or res.critical_difference is None:
        return None
    from matplotlib.figure import Figure

    items = sorted(res.average_ranks.items(), key=lambda kv: kv[1])
    k = len(items)
    fig = Figure(figsize=(8, 1.4 + 0.3 * k), layout="constrained")
    ax = fig.add_subplot()
    lo, hi = 1.0, float(k)
    ax.set_xlim(hi + 0.05 * k, lo - 0.05 * k)  # inverted: the best rank on the right
    ax.set_ylim(-(k / 2 + 1.5), 1.6)
    ax.set_yticks([])
    for side in ("left", "right", "bottom"):
        ax.spines[side].set_visible(False)
    ax.xaxis.set_ticks_position("top")
    ax.set_xlabel("average rank over seeds (1 = best)")
    ax.xaxis.set_label_position("top")
    half = (k + 1) // 2
    for i, (name, rank) in enumerate(items):  # Demsar's layout: best half to the right
        right = i < half
        y = -(i + 1) if right else -(k - i)
        edge = lo - 0.05 * k if right else hi + 0.05 * k
        ax.plot([rank, rank, edge], [0, y, y], color="0.3", lw=0.8)
        ax.text(edge, y, f" {name} ({rank:.2f}) " if right else f" ({rank:.2f}) {name} ",
                ha="left" if right else "right", va="center", fontsize=8, clip_on=False)
    cd = res.critical_difference
    ax.plot([hi, hi - cd], [1.0, 1.0], color="k", lw=2)
    ax.text(hi - cd / 2, 1.15, f"critical difference {cd:.2f}", ha="center", fontsize=8)
    for j, (a, b) in enumerate(_cliques([r for _, r in items], cd)):
        bar_y = -0.3 - 0.22 * j  # not significantly different (Nemenyi, alpha 0.05)
        ax.plot([items[a][1], items[b][1]], [bar_y, bar_y], color="tab:red", lw=3, alpha=0.7)
    ax.set_title(title or f"{res.metric}: Friedman p = {res.friedman_p:.3g}", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _cliques(ranks: list[float], cd: float) -> list[tuple[int, int]]:
    """Maximal runs of sorted ranks whose spread is below the critical difference."""
    out: list[tuple[int, int]] = []
    for i in range(len(ranks)):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] - ranks[i] < cd:
            j += 1
        if j > i and not any(a <= i and j <= b for a, b in out):
            out.append((i, j))
    return out
