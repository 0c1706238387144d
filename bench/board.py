"""`bench board`: configurations ranked within one study at a time, never across studies.

Rows are split into sections by study (its name and its uid: two studies that share a name
are two sections). Within a section, COMPLETE rows are grouped by configuration
(`config_hash`: the task and its merged parameters, the seed excluded) and ranked by the
study's own metric and direction: mean, std and n over seeds (no spread shown for n = 1).
Parameters print in their declared types; by default only those that vary within the
study are columns. A variant's `reference:` (the original report's numbers) is shown
beside the measured values, with whether each of its findings holds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from bench.registry import Task

STATES = ("COMPLETE", "PRUNED", "FAIL")


@dataclass
class Section:
    """One study's ranked configurations and what the study was."""

    study: str
    study_uid: str
    variant: str
    metric: str
    direction: str
    unit: str
    counts: dict[str, int]
    table: pd.DataFrame  # one row per configuration, best first
    params: list[str]  # the parameter columns shown
    budget: dict[str, Any] = field(default_factory=dict)
    done: pd.DataFrame = field(default_factory=pd.DataFrame)  # the COMPLETE rows
    references: list[dict[str, Any]] = field(default_factory=list)  # per-config reference
    findings: list[dict[str, Any]] = field(default_factory=list)
    source: str = ""
    same_name: bool = False  # another study of the leaderboard has this name (another uid)


def configurations(done: pd.DataFrame, params: list[str], metric_cols: list[str],
                   direction: str) -> pd.DataFrame:
    """COMPLETE rows of one study grouped by configuration, ranked by the objective
    (vectorised: a study of 100,000 trials groups in well under a second)."""
    if done.empty:  # every trial failed, or none finished: the columns, no rows
        cols = {"rank": "int64", "config_hash": "object", "mean": "float64", "std": "object",
                "n": "int64", **{p: "object" for p in params}}
        for c in metric_cols:
            cols.update({c: "float64", f"{c}_std": "float64"})
        return pd.DataFrame({c: pd.Series(dtype=d) for c, d in cols.items()})
    g = done.groupby("config_hash", sort=False)
    values = ["objective", *metric_cols]
    stats = g[values].agg(["mean", "std", "count"])
    table = pd.DataFrame({
        "config_hash": stats.index,
        "mean": stats[("objective", "mean")].to_numpy(),
        "std": stats[("objective", "std")].to_numpy(),  # NaN for one seed: no spread
        "n": stats[("objective", "count")].to_numpy(),
    })
    firsts = g[params].first() if params else None
    for p in params:
        table[p] = firsts[p].to_numpy()  # type: ignore[index]
    for c in metric_cols:
        table[c] = stats[(c, "mean")].to_numpy()
        table[f"{c}_std"] = stats[(c, "std")].to_numpy()
    table["std"] = table["std"].astype(object).where(table["n"] > 1, None)
    table = table.sort_values("mean", ascending=direction == "minimize", kind="stable")
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True)


def varying(done: pd.DataFrame, all_params: bool = False, task: Task | None = None
            ) -> list[str]:
    """The parameter columns that vary among `done` (every one with `all_params`); with
    `task`, execution parameters (not part of a configuration) are left out."""
    cols = [c for c in done.columns if c.startswith("param_")]
    if all_params:
        return cols
    skip = task.execution if task is not None else frozenset()
    return [c for c in cols if c.removeprefix("param_") not in skip and _distinct(done[c]) > 1]


def _non_default(row: pd.Series, task: Task, most: int = 8) -> list[str]:
    """The parameter columns whose value in `row` differs from the task's default."""
    out = []
    for name, decl in task.params.items():
        col = f"param_{name}"
        if col not in row.index or decl.execution:
            continue
        value = row[col]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            value = None
        if value != decl.default:
            out.append(col)
    return out[:most]


def _distinct(col: pd.Series) -> int:
    try:
        return int(col.nunique(dropna=False))
    except TypeError:  # unhashable cells: compare their text
        return int(col.astype(str).nunique(dropna=False))


def sections(rows: pd.DataFrame, task: Task, all_params: bool = False) -> list[Section]:
    """One section per study (name and uid) among `rows`."""
    if rows.empty:
        return []
    rows = rows.assign(study_uid=rows["study_uid"].fillna("") if "study_uid" in rows else "")
    out = []
    for (study, uid), g in rows.groupby(["study", "study_uid"], sort=True):
        out.append(_section(str(study), str(uid), g, task, all_params))
    names = [s.study for s in out]
    for sec in out:  # two studies of one name (one deleted and made again): told apart
        sec.same_name = names.count(sec.study) > 1
    return out


def _section(study: str, uid: str, g: pd.DataFrame, task: Task, all_params: bool) -> Section:
    metric = str(g["metric"].dropna().iloc[0]) if g["metric"].notna().any() else task.metric
    direction = str(g["direction"].dropna().iloc[0])
    done = g[g["state"] == "COMPLETE"]
    params = varying(done if len(done) > 1 else g, all_params, task)
    if not params and len(done):  # one configuration: say which (its non-default values)
        params = _non_default(done.iloc[0], task)
    metric_cols = [c for c in g.columns if c.startswith("metric_") and g[c].notna().any()]
    table = configurations(done, params, metric_cols, direction)
    counts = {s: int((g["state"] == s).sum()) for s in STATES}
    unit = task.metrics[metric].unit if metric in task.metrics else ""
    sec = Section(study, uid, str(g["variant"].iloc[0]), metric, direction, unit, counts,
                  table, params, budget(g), done)
    _attach_reference(sec, task)
    return sec


def budget(g: pd.DataFrame) -> dict[str, Any]:
    """Trials, epochs and device time a study cost."""
    hours = float(g["duration_s"].fillna(0).sum()) / 3600
    gpu = g["device"].isin([d for d in g["device"].dropna().unique()
                            if str(d).startswith("cuda")])
    epochs = g.loc[g["state"] == "COMPLETE", "epochs_done"].dropna()
    return {"trials": int(len(g)), "epochs": int(epochs.max()) if len(epochs) else None,
            "hours": round(hours, 3),
            "gpu_hours": round(float(g.loc[gpu, "duration_s"].fillna(0).sum()) / 3600, 3),
            "devices": sorted({*g["gpu_name"].dropna().unique(), *g["device"].dropna().unique()}),
            "git_shas": sorted(g["git_sha"].dropna().unique())}


# ---------------------------------------------------------------- references
def _attach_reference(sec: Section, task: Task) -> None:
    """The variant's `reference:` from the task's YAML, matched to the configurations."""
    from bench.reference import evaluate_findings, reference_for

    ref = reference_for(task.name, sec.variant)
    if ref is None:
        return
    sec.source = ref.source
    sec.references = ref.match(sec.table)
    sec.findings = evaluate_findings(ref, sec.table)


# ---------------------------------------------------------------- rendering
def cell(value: Any, decl: Any = None) -> str:
    """A parameter value in its declared type (int as int, None as '-')."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    kind = getattr(decl, "kind", None)
    if kind == "int" or (kind == "choice" and isinstance(value, float) and value.is_integer()
                         and all(isinstance(c, int) for c in decl.choices)):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def pm(mean: float, std: float | None, digits: int = 4) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} ± {std:.2g}"


def header(sec: Section) -> str:
    counts = ", ".join(f"{v} {k}" for k, v in sec.counts.items())
    kind = "variant " + sec.variant if sec.variant != "default" else "search"
    b = sec.budget
    n = b.get("epochs")
    epochs = f"; {n} epoch{'' if n == 1 else 's'}" if n else ""
    uid = f" (uid {sec.study_uid or 'unrecorded'})" if sec.same_name else ""
    return (f"study {sec.study!r}{uid} ({kind}; {sec.direction} {sec.metric}"
            f"{' in ' + sec.unit if sec.unit else ''}): {counts}{epochs}; "
            f"{b.get('hours', 0):.2f} device-hours")


NO_EFFECT = "n/a"  # a parameter without effect in that configuration (Decl.only_with)


def _settings(sec: Section, t: pd.DataFrame) -> list[dict[str, Any]]:
    """Each configuration's parameters (its first COMPLETE row's), by name."""
    cols = [c for c in sec.done.columns if c.startswith("param_")] if len(sec.done) else []
    if not cols or "config_hash" not in t:
        return [{} for _ in range(len(t))]
    firsts = sec.done.groupby("config_hash")[cols].first()
    # a row older than a parameter has no value for it: not a value that makes another
    # parameter idle (rows from before `net` existed are CNN rows)
    return [{c.removeprefix("param_"): v for c, v in firsts.loc[h].items()
             if not (v is None or (isinstance(v, float) and math.isnan(v)))}
            if h in firsts.index else {} for h in t["config_hash"]]


def display_table(sec: Section, task: Task, metrics: list[str] | None = None,
                  top: int | None = None) -> pd.DataFrame:
    """The section as strings: rank, objective mean ± std, n, parameters, extra metrics."""
    t = sec.table.head(top) if top else sec.table
    out = pd.DataFrame({"rank": t["rank"], sec.metric: [pm(m, s) for m, s in
                                                        zip(t["mean"], t["std"], strict=True)],
                        "n": t["n"]})
    if sec.references:
        out["reference"] = [r.get("text", "") for r in sec.references[: len(t)]]
    settings = _settings(sec, t)
    for p in sec.params:
        name = p.removeprefix("param_")
        decl = task.params.get(name)
        out[name] = [NO_EFFECT if decl is not None and decl.idle_because(c) else cell(v, decl)
                     for v, c in zip(t[p], settings, strict=True)]
    for m in metrics or []:
        col = f"metric_{m}"
        if col in t:
            out[m] = [pm(a, b) for a, b in zip(t[col], t[f"{col}_std"], strict=True)]
    return out


def render(secs: list[Section], task: Task, fmt: str = "table", top: int | None = None,
           metrics: list[str] | None = None) -> str:
    if fmt == "json":
        return json.dumps([r for s in secs for r in records(s, task, top)], indent=2,
                          default=_json_default)
    if fmt == "csv":
        frames = [flat(s, top) for s in secs]
        return pd.concat(frames, ignore_index=True).to_csv(index=False) if frames else ""
    parts = []
    for s in secs:
        shown = display_table(s, task, metrics, top)
        if fmt == "markdown":
            parts.append(f"### {header(s)}\n\n" + (shown.to_markdown(index=False)
                                                    if len(shown) else "no COMPLETE trial yet"))
        else:
            parts.append(header(s) + "\n" + (shown.to_string(index=False) if len(shown)
                                             else "  no COMPLETE trial yet"))
        mixed = eval_settings_note(s, metrics or [], top)
        if mixed:
            parts.append(mixed)
        if s.findings:
            parts.append(findings_text(s))
    return "\n\n".join(parts)


def eval_settings_note(sec: Section, metrics: list[str], top: int | None = None) -> str:
    """A note when the test metrics shown were computed with different `bench eval --set`
    settings (iwae_k=5 beside the study's 200): which ranks used which."""
    shown = [m for m in metrics if f"metric_{m}" in sec.done and m.startswith("test_")]
    if not shown or "eval_params" not in sec.done or sec.table.empty:
        return ""
    t = sec.table.head(top) if top else sec.table
    evaluated = sec.done[sec.done[[f"metric_{m}" for m in shown]].notna().any(axis=1)]
    by_rank: dict[str, list[int]] = {}
    for rank, h in zip(t["rank"], t["config_hash"], strict=True):
        for raw in sorted(set(evaluated.loc[evaluated["config_hash"] == h, "eval_params"]
                              .fillna("{}"))):
            given = json.loads(raw) if raw else {}
            what = (", ".join(f"{k}={v}" for k, v in sorted(given.items())) if given
                    else "the trials' own settings")
            by_rank.setdefault(what, []).append(int(rank))
    if len(by_rank) < 2:
        return ""
    return ("note: these test metrics were computed with different evaluation settings "
            "(bench eval --set), so they are not comparable across them: "
            + "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {what}"
                        for what, r in by_rank.items()))


def findings_text(sec: Section) -> str:
    lines = [f"reference: {sec.source}"] if sec.source else []
    for f in sec.findings:
        verdict = {True: "holds", False: "does NOT hold", None: "not measured"}[f["holds"]]
        lines.append(f"  finding: {f['text']} -> {verdict} at this budget"
                     + (f" ({f['detail']})" if f.get("detail") else ""))
    return "\n".join(lines)


def reference_text(sec: Section, task: Task) -> str:
    """The report's numbers beside the measured mean +- std of the same configurations,
    then its findings (what `bench compare` prints under its table); '' without any."""
    lines = []
    for (_, row), ref in zip(sec.table.iterrows(), sec.references, strict=False):
        if not ref:
            continue
        col = "mean" if ref["metric"] == sec.metric else f"metric_{ref['metric']}"
        std = "std" if col == "mean" else f"{col}_std"
        ours = pm(row[col], row.get(std)) if col in row else "-"
        names = [p.removeprefix("param_") for p in sec.params]
        label = ", ".join(f"{n}={cell(row[f'param_{n}'], task.params.get(n))}" for n in names)
        lines.append(f"  report: {label}: {ref['text']}; measured {ours}")
    if not lines and not sec.findings:
        return ""
    head = [f"reference: {sec.source}"] if sec.source else []
    findings = findings_text(sec).splitlines()[1 if sec.source else 0:] if sec.findings else []
    return "\n".join(head + lines + findings)


def records(sec: Section, task: Task, top: int | None = None) -> list[dict[str, Any]]:
    """JSON records: study, metric, direction, n, mean, std, the parameters, every metric."""
    out = []
    t = sec.table.head(top) if top else sec.table
    mine = sec.done[sec.done["config_hash"].isin(t["config_hash"])]
    seeds = mine.groupby("config_hash")["seed"].agg(lambda s: sorted(int(x) for x in s))
    for i, r in enumerate(t.to_dict("records")):
        rec = {"study": sec.study, "study_uid": sec.study_uid, "variant": sec.variant,
               "metric": sec.metric, "unit": sec.unit, "direction": sec.direction,
               "rank": int(r["rank"]), "n": int(r["n"]), "mean": _finite(r["mean"]),
               "std": _finite(r["std"]),
               "config_hash": r["config_hash"], "seeds": seeds.get(r["config_hash"], []),
               "params": {p.removeprefix("param_"): _native(r[p], task.params.get(
                   p.removeprefix("param_"))) for p in sec.params},
               "metrics": {c.removeprefix("metric_"): {"mean": _finite(r[c]),
                                                       "std": _finite(r.get(f"{c}_std"))}
                           for c in r if c.startswith("metric_") and not c.endswith("_std")}}
        if sec.references:
            rec["reference"] = sec.references[i]
        out.append(rec)
    return out


def _finite(x: Any) -> Any:
    """A number for JSON: NaN or infinity (no spread, no value) as null, which every JSON
    parser reads (NaN is not JSON)."""
    if x is None:
        return None
    x = x.item() if hasattr(x, "item") else x
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _native(value: Any, decl: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if getattr(decl, "kind", None) == "int":
        return int(value)
    return value.item() if hasattr(value, "item") else value


def _json_default(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)


def flat(sec: Section, top: int | None = None) -> pd.DataFrame:
    t = sec.table.head(top) if top else sec.table
    t = t.copy()
    t.insert(0, "direction", sec.direction)
    t.insert(0, "metric", sec.metric)
    t.insert(0, "study", sec.study)
    return t


def filter_rows(rows: pd.DataFrame, study: str | None, variant: str | None) -> pd.DataFrame:
    if rows.empty:
        return rows
    if study is not None:
        rows = rows[rows["study"] == study]
    if variant is not None:
        rows = rows[rows["variant"] == variant]
    return rows


def known(rows: pd.DataFrame, column: str) -> list[str]:
    return sorted(set(rows[column].dropna().astype(str))) if not rows.empty else []


def check_selection(rows: pd.DataFrame, task: str, study: str | None,
                    variant: str | None) -> None:
    """An unknown study or variant is an error (exit 2) naming the known ones."""
    from bench.errors import ConfigError
    from bench.params import did_you_mean

    for col, value in (("study", study), ("variant", variant)):
        names = known(rows, col)
        if value is not None and value not in names:
            raise ConfigError(f"--{col} {value!r}: no rows of task {task!r} have it; "
                              f"{did_you_mean(value, names)}known: "
                              f"{', '.join(names) or '(none yet)'}")


def as_mapping(x: Any) -> Mapping[str, Any]:
    return x if isinstance(x, Mapping) else {}
