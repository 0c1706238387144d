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


def _write_atomic(table: pa.Table, path: Path, durable: bool = True,
                  small: bool = True) -> None:
    """Write to a temporary name, then rename: readers never see half a file. `durable`:
    fsync before the rename, so the file also survives a power loss (rows); a curve or a
    cache, which can be rebuilt, skips it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    sink = pa.BufferOutputStream()  # encoded in memory, written with one system call:
    # a `small` (one-row, one-curve) file needs no statistics, dictionaries or compression,
    # and without them it is encoded in 1.2 ms instead of 1.7 (rows are written on a thread
    # beside the next trial, whose Python they slow: benchmarks/harness_overhead.py)
    options: dict[str, Any] = (dict(write_statistics=False, use_dictionary=False,
                                    compression="none") if small else {})
    pq.write_table(table, sink, **options)
    try:
        with open(tmp, "wb") as fh:
            fh.write(sink.getvalue())
            if durable:
                fh.flush()
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
        _write_atomic(ctab, base / "curves" / f"{uid}.parquet", durable=False,
                      small=len(curve) <= 64)  # a long curve compresses 4x
    path = trial_path(out, row["task"], uid)
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


def trial_path(out: str | Path, task: str, uid: str) -> Path:
    """Where a trial's row lives."""
    return task_dir(out, task) / "trials" / f"{uid}.parquet"


def trial_exists(out: str | Path, task: str, uid: str) -> bool:
    return trial_path(out, task, uid).exists()


def read_trial(out: str | Path, task: str, uid: str) -> dict[str, Any] | None:
    """One trial's row, or None when it has none (or it cannot be read)."""
    path = trial_path(out, task, uid)
    try:
        return pq.read_table(path).to_pylist()[0]
    except (OSError, pa.ArrowException, IndexError):
        return None


def _read_files(paths: Iterable[Path]) -> list[tuple[Path, pa.Table]]:
    """(path, table) of each readable file; one that cannot be read is named and skipped
    (so a table is never paired with another file's name, which the cache keys rows by)."""
    tables = []
    for path in paths:
        try:
            tables.append((path, pq.read_table(path)))
        except (OSError, pa.ArrowException) as exc:
            warnings.warn(f"{path}: unreadable leaderboard file skipped ({exc})", stacklevel=4)
    return tables


def _union(tables: list[tuple[str, pa.Table]]) -> pa.Table | None:
    """Tables with their schemas unioned; a table whose columns conflict with the others'
    types is named in a warning and skipped."""
    keep, schema = [], None
    for name, table in tables:
        try:
            schema = table.schema if schema is None else pa.unify_schemas(
                [schema, table.schema], promote_options="permissive")
        except (pa.ArrowException, TypeError) as exc:
            warnings.warn(f"{name}: leaderboard file skipped: its columns conflict with the "
                          f"other files' types ({exc})", stacklevel=4)
            continue
        keep.append(table)
    return pa.concat_tables(keep, promote_options="permissive") if keep else None


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """name -> (mtime_ns, size) of the visible Parquet files of `folder`."""
    out = {}
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return {}
    for e in entries:
        if e.name.endswith(".parquet") and not e.name.startswith((".", "_")):
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            out[e.name] = (st.st_mtime_ns, st.st_size)
    return out


CACHE_KEYS = ("_file", "_mtime_ns", "_size")


def _read_dir(folder: Path, cache: Path | None = None) -> pd.DataFrame:
    """Every readable file of `folder` as one frame (see `_union`).

    With `cache`, the rows already read are kept in one Parquet file keyed by each source
    file's name, mtime and size, and only new or changed files are read: a leaderboard of
    100,000 trials reads in about a second instead of minutes. The cache is an accelerator
    only (written atomically, checked against the folder on every read)."""
    listing = _listing(folder)
    cached: pa.Table | None = None
    if cache is not None and cache.exists():
        try:
            cached = pq.read_table(cache)
        except (OSError, pa.ArrowException):
            cached = None
    valid = set()
    if cached is not None and cached.num_rows:
        keys = zip(*(cached.column(k).to_pylist() for k in CACHE_KEYS), strict=True)
        valid = {f for f, m, sz in keys if listing.get(f) == (m, sz)}
        if len(valid) < cached.num_rows:
            mask = pa.array([f in valid for f in cached.column("_file").to_pylist()])
            cached = cached.filter(mask)
    fresh = sorted(set(listing) - valid)
    tables = [(str(path), t) for path, t in _read_files(folder / n for n in fresh)]
    tables = [(n, _keyed(t, Path(n).name, listing)) for n, t in tables] if cache else tables
    if cached is not None and cached.num_rows:
        tables.insert(0, (str(cache), cached))
    merged = _union(tables)
    if merged is None:
        return pd.DataFrame()
    if cache is not None and fresh:
        _write_cache(merged, cache)
    return merged.drop([k for k in CACHE_KEYS if k in merged.column_names]).to_pandas()


def _keyed(table: pa.Table, name: str, listing: dict[str, tuple[int, int]]) -> pa.Table:
    m, sz = listing[name]
    n = table.num_rows
    return (table.append_column("_file", pa.array([name] * n))
            .append_column("_mtime_ns", pa.array([m] * n, pa.int64()))
            .append_column("_size", pa.array([sz] * n, pa.int64())))


def _write_cache(table: pa.Table, cache: Path) -> None:
    try:
        _write_atomic(table, cache, durable=False, small=False)
    except OSError:
        pass  # a read-only leaderboard is still readable, only slower


def read_trials(out: str | Path, task: str, study: str | None = None,
                variant: str | None = None) -> pd.DataFrame:
    """The task's rows (every state), optionally of one study or variant."""
    base = task_dir(out, task)
    df = _read_dir(base / "trials", base / ".cache" / "trials.parquet")
    if df.empty:
        return df
    df = _fill_added_params(df, task)
    if study is not None:
        df = df[df["study"] == study]
    if variant is not None:
        df = df[df["variant"] == variant]
    return df.reset_index(drop=True)


def _fill_added_params(df: pd.DataFrame, task: str) -> pd.DataFrame:
    """Rows written before a parameter was added (`Decl.since`) ran with its default: they
    read with it, so a board does not split one configuration into old and new rows."""
    from bench.registry import UnknownTaskError, get_task

    try:
        decls = get_task(task).params
    except UnknownTaskError:  # rows of a task this installation does not declare
        return df
    for name, decl in decls.items():
        col = f"param_{name}"
        if decl.since is None or decl.default is None:
            continue
        if col not in df.columns:
            df[col] = [decl.default] * len(df)
        elif df[col].isna().any():
            df[col] = df[col].astype(object).where(df[col].notna(), decl.default) \
                .infer_objects()
    return df


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
