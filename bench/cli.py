"""`bench` command line: argument parsing and wiring of the subcommands, nothing more."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.errors import BenchError, ConfigError


def install_signal_handlers() -> None:
    """SIGTERM ends a run like Ctrl-C: the running trial is marked FAIL and gets its row."""

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)


def default_out() -> Path:
    return Path(os.environ.get("BENCH_OUT", "leaderboards"))


def cmd_list(args: argparse.Namespace) -> int:
    from bench.registry import list_tasks
    from bench.space import space_for

    for task in list_tasks():
        space = space_for(task.name)
        print(f"{task.name}: {task.doc}")
        print(f"  objective: {space.direction} {space.metric}   space: {space.source}")
        for p in space.params.values():
            rng = list(p.choices) if p.type == "categorical" else f"[{p.low}, {p.high}]"
            print(f"  param {p.name}: {p.type} {rng}{' log' if p.log else ''}")
        for v in space.variants.values():
            what = (f"grid {dict(v.grid)}" if v.grid else
                    f"search {', '.join(v.params)}" if v.params else f"fixed {dict(v.fixed)}")
            print(f"  variant {v.name}: {what}, seeds={v.seeds}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from bench.space import spaces_dir, validate_file

    paths = [Path(p) for p in args.paths] or sorted(spaces_dir().glob("*.yaml"))
    problems: list[str] = []
    for path in paths:
        found, summary = validate_file(path, args.set)
        problems.extend(found)
        if not found:
            print(f"ok: {path} ({summary})")
    if problems:
        raise ConfigError(problems)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from bench.backends._base import RunOptions
    from bench.registry import get_task
    from bench.space import parse_overrides

    opts = RunOptions(
        task=args.task, trials=args.trials, variant=args.variant, sampler=args.sampler,
        pruner=args.pruner, seed=args.seed,
        overrides=parse_overrides(args.set, get_task(args.task)),
        study=args.study, storage=args.storage, out=args.out, data_dir=args.data_dir,
        device=args.device, workers=args.workers, space_file=args.space,
        progress=not args.quiet, extra=_backend_extra(args))
    result: Any
    if args.backend == "ray":
        from bench.backends import ray as ray_backend

        result = ray_backend.run(opts)
    else:
        from bench.backends import optuna as optuna_backend
        from bench.progress import Progress

        install_signal_handlers()
        result = optuna_backend.run(opts, Progress)
        if result.stale_failed:
            print(f"marked FAIL (left RUNNING by a killed run): trials {result.stale_failed}")
    _summary(result, args)
    return int(getattr(result, "exit_code", 0))  # 75: a worker slot suspended on SIGUSR2


def _backend_extra(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("gpus_per_trial", "cpus_per_trial", "address", "max_failures", "resume",
            "worker_id")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _summary(result: Any, args: argparse.Namespace) -> None:
    from bench import leaderboard

    plan = result.plan
    rows = leaderboard.read_trials(args.out, plan.task.name, study=plan.study_name)
    counts = rows["state"].value_counts().to_dict() if not rows.empty else {}
    print(f"\n{result.storage_note}: " + ", ".join(f"{counts.get(s, 0)} {s}"
                                                  for s in leaderboard.STATES))
    table = leaderboard.rank(rows)
    if table.empty:
        print("no COMPLETE trial yet")
        return
    keep = ["rank", "objective_mean", "objective_std", "n"]
    keep += [c for c in table.columns if c.startswith("param_")]
    print(f"top configurations ({plan.direction} {plan.metric}):")
    print(leaderboard.format_table(table[keep].head(10)))


def cmd_board(args: argparse.Namespace) -> int:
    from bench import leaderboard

    table = leaderboard.board(args.out, args.task, args.study, args.variant, args.top, args.by)
    if table.empty:
        print(f"no COMPLETE trials for {args.task!r} under {args.out}", file=sys.stderr)
        return 1
    print(leaderboard.format_table(table, args.format))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from bench import plots

    paths = plots.make_plots(args.task, args.out, study=args.study, variant=args.variant,
                             data_dir=args.data_dir)
    for path in paths:
        print(path)
    return 0


def cmd_data_brain_sim(args: argparse.Namespace) -> int:
    from bench.brain.sim import write_cohort

    print(write_cohort(args.out, args.n, args.shape, args.seed))
    return 0


def cmd_data_brain_check(args: argparse.Namespace) -> int:
    from bench.brain.cohort import CohortSpec, load_cohort

    spec = CohortSpec(args.cohort, args.shape, args.metadata, args.file_pattern)
    cohort = load_cohort(spec, args.on_bad_file)  # DataError listing every bad file: exit 2
    print(f"ok: {len(cohort.meta)} subjects at {args.shape}^3 from {args.cohort}")
    return 0


def _add_data(sub: Any) -> None:
    data = sub.add_parser("data", help="data utilities").add_subparsers(dest="data_command",
                                                                       required=True)
    p = data.add_parser("brain-sim", help="write a simulated T1 cohort (MNI152 template)")
    p.add_argument("--n", type=int, default=600, help="subjects (default 600)")
    p.add_argument("--shape", type=int, default=96, help="cube edge in voxels (default 96)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="cohort folder to write")
    p.set_defaults(func=cmd_data_brain_sim)
    p = data.add_parser("brain-check", help="read every image of a cohort; exit 2 listing "
                        "every bad file or row")
    p.add_argument("cohort", type=Path)
    p.add_argument("--shape", type=int, default=96)
    p.add_argument("--metadata", default="metadata.csv")
    p.add_argument("--file-pattern", default="{id}.nii.gz")
    p.add_argument("--on-bad-file", choices=("error", "skip"), default="error")
    p.set_defaults(func=cmd_data_brain_check)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=default_out(),
                   help="leaderboard root (default: $BENCH_OUT or ./leaderboards)")


def build_parser() -> argparse.ArgumentParser:
    from bench.backends.optuna import PRUNERS, SAMPLERS

    parser = argparse.ArgumentParser(prog="bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="tasks, their variants and search spaces")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("validate", help="check search-space files; exit 2 listing every error")
    p.add_argument("paths", nargs="*", help="YAML files (default: every shipped space)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help="run trials of a task")
    p.add_argument("task")
    p.add_argument("--trials", type=int, help="trials to add (default 20; a variant: all missing)")
    p.add_argument("--variant", help="a named variant from the task's YAML")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe")
    p.add_argument("--pruner", choices=PRUNERS,
                   help="default: median for searches, none for enumerated variants")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fixed-parameter override (repeatable)")
    p.add_argument("--study", help="study name (default: TASK or TASK.VARIANT); reuse to resume")
    p.add_argument("--storage", help="Optuna storage URL, or a journal-file path")
    p.add_argument("--space", type=Path, help="search-space YAML (default: the task's own)")
    p.add_argument("--data-dir", type=Path, help="data root (default: $BENCH_DATA)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the study")
    p.add_argument("--backend", choices=("optuna", "ray"), default="optuna")
    p.add_argument("--gpus-per-trial", type=float, help="ray: GPUs per trial (may be fractional)")
    p.add_argument("--cpus-per-trial", type=float, help="ray: CPUs per trial")
    p.add_argument("--address", help="ray: address of an existing cluster")
    p.add_argument("--max-failures", type=int, help="ray: retries of a failed trial")
    p.add_argument("--resume", action="store_true", default=None,
                   help="ray: continue an interrupted experiment")
    p.add_argument("--worker-id", help="optuna: a worker slot kept across restarts (bench "
                   "slurm sets it): --trials counts its trials in total; SIGUSR2 suspends "
                   "its trial, which it resumes when restarted")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("board", help="ranked table: mean +- std and n over seeds")
    p.add_argument("task")
    p.add_argument("--format", choices=("table", "csv", "markdown", "json"), default="table")
    p.add_argument("--top", type=int)
    p.add_argument("--study")
    p.add_argument("--variant")
    p.add_argument("--by", default="config_hash", help="group by config_hash (default) or variant")
    _add_common(p)
    p.set_defaults(func=cmd_board)

    p = sub.add_parser("plot", help="comparison figures (PNG) from the leaderboard")
    p.add_argument("task")
    p.add_argument("--study")
    p.add_argument("--variant")
    p.add_argument("--data-dir", type=Path)
    _add_common(p)
    p.set_defaults(func=cmd_plot)

    _add_data(sub)
    from bench.backends.slurm import add_slurm_parser

    add_slurm_parser(sub, _add_common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted; finished trials are saved. Rerun the same command to resume.",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
