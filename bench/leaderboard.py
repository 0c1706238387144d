"""The Parquet leaderboard: one file per finished trial, curves in long format.

`<out>/<task>/trials/<trial_uid>.parquet` is written to a temporary name that starts with
`.` and moved into place with `os.replace`, so concurrent writers never share a file and a
reader never sees half of one. Every file of a task has the same columns with the same
types (`task_schema`: the fixed columns, `param_<name>` typed by the task's declarations,
`metric_<name>` for every declared metric, null where a trial has none), so pandas,
pyarrow datasets and DuckDB read the folder as it is. Readers also union older files'
schemas, and name and skip any file they cannot read or merge.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bench import faults

IDENTITY = ["task", "study", "study_uid", "variant", "trial_uid", "trial_number", "backend",
            "sampler", "pruner", "seed", "group_id", "group_size"]
RESULTS = ["state", "objective", "metric", "direction", "error",  # metric: the objective's name
           "evaluated_at", "eval_params"]
COST = ["started_at", "finished_at", "duration_s", "train_s", "epochs_done", "attempts",
        "peak_mem_gb"]
PROVENANCE = ["config_hash", "git_sha", "bench_version", "torch_version", "device", "gpu_name",
              "host"]
STATES = ("COMPLETE", "PRUNED", "FAIL")
_TS = pa.timestamp("us", tz="UTC")
FIXED_TYPES: dict[str, pa.DataType] = {
    **{c: pa.string() for c in IDENTITY + RESULTS + PROVENANCE},
    "trial_number": pa.int64(), "seed": pa.int64(), "group_size": pa.int64(),
    "objective": pa.float64(), "evaluated_at": _TS, "started_at": _TS, "finished_at": _TS,
    "duration_s": pa.float64(), "train_s": pa.float64(), "epochs_done": pa.int64(),
    "attempts": pa.int64(), "peak_mem_gb": pa.float64(),
}
COLUMNS = IDENTITY + RESULTS + COST + PROVENANCE


def task_dir(out: str | Path, task: str) -> Path:
    return Path(out) / task


def task_schema(spec: Any) -> pa.Schema:
    """The one schema of a task's rows: fixed columns, declared parameters and metrics."""
    fields = [pa.field(c, FIXED_TYPES[c]) for c in COLUMNS]
    fields += [pa.field(f"param_{k}", d.arrow_type()) for k, d in spec.params.items()]
    fields += [pa.field(f"metric_{k}", pa.float64()) for k in spec.metrics]
    return pa.schema(fields)


def _cell(value: Any) -> Any:
    """Parquet-friendly scalar: containers become JSON text so every column has one type."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True)
    return value


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def _write_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        faults.pause("row-write")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _table(row: Mapping[str, Any], schema: pa.Schema | None) -> pa.Table:
    cells = {k: _cell(v) for k, v in row.items()}
    if schema is None:
        return pa.Table.from_pylist([cells])
    extra = sorted(set(cells) - set(schema.names))
    if extra:
        raise ValueError(f"row columns {extra} are not in the task's schema")
    return pa.Table.from_pylist([cells], schema=schema)


def write_trial(out: str | Path, row: Mapping[str, Any],
                curve: Sequence[tuple[int, str, float]] = (),
                schema: pa.Schema | None = None) -> Path:
    """Write a trial's curve (if any), then its row; the row's presence implies its curve's.

    With `schema` (see `task_schema`) every column is written with its declared type."""
    base = task_dir(out, row["task"])
    uid = row["trial_uid"]
    if curve:
        steps, names, values = zip(*curve, strict=True)
        ctab = pa.table({"trial_uid": [uid] * len(curve), "step": pa.array(steps, pa.int64()),
                         "metric": list(names), "value": pa.array(values, pa.float64())})
        _write_atomic(ctab, base / "curves" / f"{uid}.parquet")
    path = base / "trials" / f"{uid}.parquet"
    _write_atomic(_table(row, schema), path)
    return path


def clean_stale_tmp(out: str | Path, task: str, max_age_s: float = 86_400) -> list[Path]:
    """Remove temporary files left by killed writers: this host's whose process is gone,
    any host's older than `max_age_s`."""
    removed = []
    host = socket.gethostname()
    for sub in ("trials", "curves"):
        for path in (task_dir(out, task) / sub).glob(".*.tmp"):
            parts = path.name.rsplit(".", 3)  # .<name>.<host>.<pid>.tmp
            try:
                same_host, pid = parts[1] == host, int(parts[2])
                age = time.time() - path.stat().st_mtime
            except (IndexError, ValueError, OSError):
                continue
            if (same_host and not _alive(pid)) or age > max_age_s:
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def trial_exists(out: str | Path, task: str, uid: str) -> bool:
    return (task_dir(out, task) / "trials" / f"{uid}.parquet").exists()


def read_trial(out: str | Path, task: str, uid: str) -> dict[str, Any] | None:
    """One trial's row, or None when it has none (or it cannot be read)."""
    path = task_dir(out, task) / "trials" / f"{uid}.parquet"
    try:
        return pq.read_table(path).to_pylist()[0]
    except (OSError, pa.ArrowException, IndexError):
        return None


def _read_dir(folder: Path) -> pd.DataFrame:
    """Every readable file of `folder`, schemas unioned; a file that cannot be read or whose
    columns conflict with the others' types is named in a warning and skipped."""
    tables: list[pa.Table] = []
    schema: pa.Schema | None = None
    for path in sorted(folder.glob("[!._]*.parquet")):
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            warnings.warn(f"{path}: unreadable leaderboard file skipped ({exc})", stacklevel=3)
            continue
        try:
            merged = table.schema if schema is None else pa.unify_schemas(
                [schema, table.schema], promote_options="permissive")
        except (pa.ArrowException, TypeError) as exc:
            warnings.warn(f"{path}: leaderboard file skipped: its columns conflict with the "
                          f"other files' types ({exc})", stacklevel=3)
            continue
        schema = merged
        tables.append(table)
    if not tables:
        return pd.DataFrame()
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


def read_trials(out: str | Path, task: str, study: str | None = None,
                variant: str | None = None) -> pd.DataFrame:
    df = _read_dir(task_dir(out, task) / "trials")
    if df.empty:
        return df
    if study is not None:
        df = df[df["study"] == study]
    if variant is not None:
        df = df[df["variant"] == variant]
    return df.reset_index(drop=True)


def read_curves(out: str | Path, task: str, uids: Iterable[str] | None = None) -> pd.DataFrame:
    folder = task_dir(out, task) / "curves"
    if uids is None:
        return _read_dir(folder)
    frames = []
    for uid in uids:
        path = folder / f"{uid}.parquet"
        if path.exists():
            frames.append(pq.read_table(path).to_pandas())
    if not frames:
        return pd.DataFrame(columns=["trial_uid", "step", "metric", "value"])
    return pd.concat(frames, ignore_index=True)


def param_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("param_")]


def metric_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("metric_")]


def rank(df: pd.DataFrame, by: str = "config_hash") -> pd.DataFrame:
    """Group COMPLETE rows by configuration; mean, std and n over seeds; best first.

    `objective_mean/_std` summarise the objective; `metric_X` and `metric_X_std` every
    final metric. The varying parameters are kept (equal within a config).
    """
    done = df[df["state"] == "COMPLETE"] if not df.empty else df
    if done.empty:
        return pd.DataFrame()
    direction = done["direction"].iloc[0]
    params = [c for c in param_columns(done) if done[c].astype(str).nunique(dropna=False) > 1]
    keys = [by] if by == "config_hash" else [by, "config_hash"]
    grouped = done.groupby(keys, dropna=False, sort=False)
    table = grouped.agg(
        objective_mean=("objective", "mean"), objective_std=("objective", "std"),
        n=("objective", "size"), variant=("variant", "first"), study=("study", "first"),
        **{c: (c, "first") for c in params},
        **{k: v for c in metric_columns(done)
           for k, v in ((c, (c, "mean")), (f"{c}_std", (c, "std")))},
    ).reset_index()
    stds = [c for c in table.columns if c.endswith("_std")]
    table[stds] = table[stds].fillna(0.0)  # one seed: no spread
    table = table.sort_values("objective_mean", ascending=direction == "minimize")
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True)


def format_table(df: pd.DataFrame, fmt: str = "table", float_digits: int = 4) -> str:
    """Render a ranked table as an aligned table, CSV, Markdown or JSON records."""
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        return df.to_json(orient="records", indent=2, date_format="iso")
    shown = _mean_pm_std(df).rename(
        columns=lambda c: c.removeprefix("param_").removeprefix("metric_"))
    if fmt == "markdown":
        return shown.to_markdown(index=False, floatfmt=f".{float_digits}g")
    if fmt == "table":
        return shown.to_string(index=False, float_format=lambda x: f"{x:.{float_digits}g}")
    raise ValueError(f"format must be table, csv, markdown or json, got {fmt!r}")


def _mean_pm_std(df: pd.DataFrame) -> pd.DataFrame:
    """For people: `X` and `X_std` become one text column "mean +- std"."""
    out = df.copy()
    for std in [c for c in df.columns if c.endswith("_std")]:
        mean = "objective_mean" if std == "objective_std" else std.removesuffix("_std")
        if mean not in df.columns:
            continue
        name = "objective" if mean == "objective_mean" else mean
        out[mean] = [f"{m:.4g} +- {s:.2g}" if pd.notna(m) else "" for m, s in
                     zip(df[mean], df[std], strict=True)]
        out = out.drop(columns=std).rename(columns={mean: name})
    return out


def board(out: str | Path, task: str, study: str | None = None, variant: str | None = None,
          top: int | None = None, by: str = "config_hash") -> pd.DataFrame:
    """The ranked table of `bench board`, with a per-state count of the rows it came from."""
    rows = read_trials(out, task, study, variant)
    table = rank(rows, by)
    return table.head(top) if top else table


def find_trial(out: str | Path, uid: str) -> tuple[str, dict[str, Any]] | None:
    """(task, row) of the trial `uid` in any task under `out`, or None."""
    for path in sorted(Path(out).glob(f"*/trials/{uid}.parquet")):
        row = read_trial(out, path.parent.parent.name, uid)
        if row is not None:
            return path.parent.parent.name, row
    return None


def update_trial(out: str | Path, task: str, uid: str, updates: Mapping[str, Any],
                 schema: pa.Schema | None = None) -> Path:
    """Rewrite one row with `updates` (atomically, like every write)."""
    row = read_trial(out, task, uid)
    if row is None:
        raise FileNotFoundError(f"no readable row for trial {uid} of {task} under {out}")
    row.update(updates)
    path = task_dir(out, task) / "trials" / f"{uid}.parquet"
    _write_atomic(_table(row, schema), path)
    return path
