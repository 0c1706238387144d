"""`bench` command line: argument parsing and wiring of the subcommands, nothing more."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.errors import BenchError, ConfigError

SUMMARY = """\
Hyperparameter search and benchmarking for deep-learning experiments.

  bench list                          tasks, their parameters, search spaces and variants
  bench run vae --smoke               a seconds-long CPU run of a task, to try it out
  bench run vae --trials 50           TPE with pruning; rows land in ./leaderboards/vae/
  bench run vae --variant beta-sweep  a named study from the task's YAML, over seeds
  bench eval vae --top 3              test-set metrics for the best configurations
  bench board vae                     the ranked table, mean +- std over seeds
  bench plot vae                      comparison figures (PNG) from the leaderboard

Rerunning a command continues its study to the same total; Ctrl-C saves the running
trial at its last epoch and the next run resumes it. `bench COMMAND --help` for details.
"""


def default_out() -> Path:
    return Path(os.environ.get("BENCH_OUT", "leaderboards"))


def cmd_list(args: argparse.Namespace) -> int:
    from bench.registry import get_task, list_tasks
    from bench.space import space_for

    tasks = [get_task(args.task)] if args.task else list_tasks()
    for task in tasks:
        try:
            space = space_for(task.name)
        except ConfigError as exc:
            print(f"{task.name}: {task.doc}\n  search space: {exc}")
            continue
        print(f"{task.name}: {task.doc}")
        print(f"  objective: {space.direction} {space.metric}   space: {space.source}")
        if task.requires:
            import importlib.util

            missing = [m for m in task.requires[1] if importlib.util.find_spec(m) is None]
            if missing:
                print(f"  needs: pip install -e '.[{task.requires[0]}]' ({', '.join(missing)} "
                      "not installed)")
        for p in space.params.values():
            rng = (", ".join(map(str, p.choices)) if p.type == "categorical"
                   else f"[{_num(p.low)}, {_num(p.high)}]")
            step = f" step {_num(p.step)}" if p.type != "categorical" and p.step else ""
            print(f"  param {p.name}: {p.type} {rng}{step}{' log' if p.log else ''}")
        for v in space.variants.values():
            what = (f"grid {dict(v.grid)}" if v.grid else
                    f"search {', '.join(v.params)}" if v.params else "one point")
            data = {**space.fixed, **v.fixed}.get("dataset") or task.defaults.get("dataset")
            print(f"  variant {v.name}: {v.description or what}")
            print(f"    {what}, seeds={v.seeds}" + (f", data: {data}" if data else ""))
        if args.task:  # one task: everything `--set` takes, with its default and rule
            print("  parameters (--set NAME=VALUE; * = execution only, may change within a "
                  "study):")
            for name, d in task.params.items():
                star = "*" if d.execution else ""
                print(f"    {name}{star} = {d.default!r}: {d.rule()}"
                      + (f"; {d.help}" if d.help else ""))
    if not args.task:
        print("\n`bench list TASK` adds every parameter `--set` takes.")
    return 0


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def cmd_validate(args: argparse.Namespace) -> int:
    from bench.space import spaces_dir, validate_file

    paths = [Path(p) for p in args.paths] or sorted(spaces_dir().glob("*.yaml"))
    problems: list[str] = []
    for path in paths:
        found, summary, notes = validate_file(path, args.set)
        for note in notes:
            print(note, file=sys.stderr)
        problems.extend(found)
        if not found:
            print(f"ok: {path} ({summary})")
    if problems:
        raise ConfigError(problems)
    return 0


def run_options(args: argparse.Namespace) -> Any:
    from bench.plan import RunOptions
    from bench.registry import get_task
    from bench.space import parse_overrides

    extra = {k: getattr(args, k) for k in ("gpus_per_trial", "cpus_per_trial", "address",
                                            "max_failures", "resume", "worker_id")
             if getattr(args, k, None) is not None}
    return RunOptions(
        task=args.task, trials=args.trials, add=args.add, variant=args.variant,
        sampler=args.sampler, pruner=args.pruner, seed=args.seed,
        overrides=parse_overrides(args.set, get_task(args.task)), study=args.study,
        storage=args.storage, out=args.out, data_dir=args.data_dir, device=args.device,
        workers=args.workers, space_file=args.space, progress=not args.quiet,
        smoke=args.smoke, timeout_s=args.timeout, eval_top=args.eval_top,
        checkpoint_every_s=args.checkpoint_every, fuse=_fuse(args.fuse), backend=args.backend,
        extra=extra)


def _fuse(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        return value  # make_plan names the rule


def _at_least_1(text: str) -> int:
    """argparse type: a whole number >= 1 (exit 2 naming the value otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def cmd_run(args: argparse.Namespace) -> int:
    from bench.backends._base import get_backend
    from bench.plan import make_plan
    from bench.progress import Progress

    opts = run_options(args)
    backend = get_backend(opts.backend)
    plan = make_plan(opts)
    for note in plan.notes:
        print(note, file=sys.stderr)
    grid = plan.variant.grid if plan.variant else {}
    for key in sorted(set(grid) & set(opts.overrides)):  # allowed (a slice), but say so
        print(f"note: --set {key} fixes the variant's grid axis {key!r} (its values "
              f"{grid[key]}): this study runs one of them", file=sys.stderr)
    result = backend.run(plan, Progress)
    _summary(result, args)
    if args.eval_top and result.exit_code == 0:
        _evaluate(plan.task.name, args.out, plan.study_name, None, args.eval_top, {},
                  args.device, args.data_dir)
    return int(result.exit_code)


def _summary(result: Any, args: argparse.Namespace) -> None:
    from bench import board, leaderboard

    plan = result.plan
    for message in result.messages:
        print(message, file=sys.stderr)
    counts = result.counts
    line = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("COMPLETE", "PRUNED", "FAIL"))
    for extra in ("RUNNING", "SUSPENDED"):
        if counts.get(extra):
            line += f", {counts[extra]} {extra}"
    target = f" (target {result.target})" if result.target is not None else ""
    print(f"\n{result.storage_note}: {line}{target}")
    if result.ran:
        print("this run: " + ", ".join(f"{v} {k}" for k, v in sorted(result.ran.items())))
    if result.exit_code in (130, 143) and result.ran.get("SUSPENDED"):
        print("stopped: interrupted trials were saved at their last finished epoch; run the "
              "same command again to resume them", file=sys.stderr)
    elif result.exit_code in (130, 143):  # between trials, or before the first
        print("stopped: no trial was left half-done; run the same command again to go on",
              file=sys.stderr)
    rows = leaderboard.read_trials(args.out, plan.task.name, study=plan.study_name)
    secs = board.sections(rows, plan.task)
    if not secs or secs[-1].table.empty:
        print("no COMPLETE trial yet")
        return
    print(f"top configurations ({plan.direction} {plan.metric}):")
    print(board.display_table(secs[-1], plan.task).head(10).to_string(index=False))
    if plan.task.has_test_metrics and not plan.evaluates_every_trial() and not args.eval_top:
        print(f"\ntest-set metrics for the finalists: bench eval {plan.task.name} --study "
              f"{plan.study_name} --top 3" + (f" --out {args.out}"
                                               if str(args.out) != "leaderboards" else ""))


def _evaluate(task_name: str, out: Path, study: str | None, variant: str | None, top: int,
              overrides: dict[str, Any], device: str, data_dir: Path | None) -> int:
    from bench import leaderboard
    from bench.evaluate import check_eval, evaluate_rows, finalists
    from bench.registry import get_task

    task = get_task(task_name)
    check_eval(task, overrides)  # before anything is said to be under way
    rows = leaderboard.read_trials(out, task.name, study=study, variant=variant)
    chosen = finalists(rows, top)
    if chosen.empty:
        where = f"study {study!r}" if study else f"variant {variant!r}" if variant else "any study"
        raise BenchError(f"no COMPLETE trial of {task.name!r} in {where} under {out} to "
                         "evaluate")
    settings = (", ".join(f"{k}={v}" for k, v in sorted(overrides.items())) if overrides
                else "each trial's own evaluation settings")
    print(f"evaluating {len(chosen)} trial(s) of the top {top} configuration(s) on the test "
          f"set, with {settings}")
    evaluate_rows(task, chosen, out, overrides, device, data_dir,
                  echo=lambda text: print(text, flush=True))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from bench import board, leaderboard
    from bench.registry import get_task
    from bench.space import parse_overrides

    task = get_task(args.task)
    study = args.study
    if study is None and args.variant is None:
        study = task.name
    rows = leaderboard.read_trials(args.out, task.name)
    board.check_selection(rows, task.name, study, args.variant)
    return _evaluate(task.name, args.out, study, args.variant, args.top,
                     parse_overrides(args.set, task), args.device, args.data_dir)


def cmd_rerun(args: argparse.Namespace) -> int:
    from bench.evaluate import rerun

    r = rerun(args.out, args.uid, args.device, args.data_dir, args.record)
    print(f"{r.task} trial {r.uid}: original objective {r.original!r}, rerun {r.again!r} "
          f"({r.state}{': ' + r.error if r.error else ''})")
    if r.original is not None and r.again is not None:
        rel = abs(r.again - r.original) / max(abs(r.original), 1e-12)
        print("equal" if r.again == r.original else f"relative difference {rel:.3g}")
    return 0 if r.state == "COMPLETE" else 1


def cmd_board(args: argparse.Namespace) -> int:
    from bench import board, leaderboard
    from bench.registry import get_task

    task = get_task(args.task)
    rows = leaderboard.read_trials(args.out, task.name)
    if rows.empty:
        print(f"no trials of {task.name!r} under {args.out}: "
              f"`bench run {task.name} --out {args.out}` adds some", file=sys.stderr)
        return 1
    board.check_selection(rows, task.name, args.study, args.variant)
    secs = board.sections(board.filter_rows(rows, args.study, args.variant), task,
                          args.all_params)
    metrics = list(dict.fromkeys(m.strip() for given in args.metrics or []
                                 for m in given.split(",") if m.strip()))
    unknown = [m for m in metrics if m not in task.metrics]
    if unknown:
        from bench.params import did_you_mean

        hints = "".join(did_you_mean(m, task.metrics) for m in unknown)
        raise ConfigError(f"--metrics: {', '.join(unknown)} not metrics of {task.name!r}; "
                          f"{hints}known: {', '.join(sorted(task.metrics))}")
    print(board.render(secs, task, args.format, args.top, metrics))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from bench import board, compare, leaderboard
    from bench.registry import get_task

    task = get_task(args.task)
    rows = leaderboard.read_trials(args.out, task.name)
    studies = args.study or ([] if args.variant else [task.name])
    for s in studies:
        board.check_selection(rows, task.name, s, None)
    board.check_selection(rows, task.name, None, args.variant)
    if len(studies) > 2:
        raise ConfigError(f"--study: give one or two studies, got {len(studies)}")
    sel = rows[rows["study"].isin(studies)] if studies else rows[rows["variant"] == args.variant]
    if sel["study"].nunique() > 1 and not studies:
        raise ConfigError(f"--variant {args.variant!r} has several studies "
                          f"({', '.join(sorted(sel['study'].unique()))}); name one with --study")
    metric = args.metric or str(sel["metric"].dropna().iloc[0])
    if metric not in task.metrics:
        from bench.params import did_you_mean

        raise ConfigError(f"--metric {metric!r}: not a metric of {task.name!r}; "
                          f"{did_you_mean(metric, task.metrics)}known: "
                          f"{', '.join(sorted(task.metrics))}")
    direction = str(sel["direction"].dropna().iloc[0]) if metric == sel["metric"].iloc[0] \
        else ("minimize" if args.minimize else "maximize") if args.metric else "maximize"
    if args.metric and metric != sel["metric"].iloc[0] and args.minimize is None:
        raise ConfigError(f"--metric {metric}: not the study's objective; say which way is "
                          "better with --minimize or --maximize")
    params = board.varying(sel[sel["state"] == "COMPLETE"], task=task)
    if len(studies) == 2:
        sel = sel.assign(param_study=sel["study"])
        params = ["param_study", *params]
    res = compare.compare(sel, metric, direction, params)
    title = f"{task.name}: " + (" vs ".join(studies) if studies else f"variant {args.variant}")
    print(compare.render(res, args.format, title))
    if len(studies) < 2 and args.format != "json":  # one study: the report beside it
        for sec in board.sections(sel, task):
            text = board.reference_text(sec, task)
            if text:
                print(text)
    name = "-".join(studies) if studies else str(sel["study"].iloc[0])  # the study's folder
    png = compare.cd_diagram(res, args.out / task.name / "plots" / name /
                             "critical_difference.png", title)
    if png is not None and args.format != "json":
        print(f"critical-difference diagram: {png}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bench.registry import get_task
    from bench.report import write_report

    print(write_report(get_task(args.task), args.out, args.study, args.data_dir))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from bench import plots

    result = plots.make_plots(args.task, args.out, study=args.study, variant=args.variant,
                              data_dir=args.data_dir)
    for path in result.paths:
        print(path)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return 1 if result.no_rows else 0  # as `bench board` on an empty leaderboard


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


def _add_run(sub: Any) -> None:
    p = sub.add_parser("run", help="run trials of a task (a search, or a variant)")
    p.add_argument("task")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--trials", type=int, help="the study's total of trials (default 20; a "
                   "variant: all its points x seeds); a rerun continues to it")
    n.add_argument("--add", type=int, metavar="N", help="run N more trials than the study has")
    p.add_argument("--variant", help="a named variant from the task's YAML")
    p.add_argument("--smoke", action="store_true",
                   help="the task's seconds-long CPU budget (study TASK.smoke)")
    p.add_argument("--sampler", default="tpe", help="tpe (default), random, grid, cmaes, qmc")
    p.add_argument("--pruner", help="median, asha, hyperband or none (default: median for "
                   "searches, none for enumerated variants)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fixed-parameter override (repeatable)")
    p.add_argument("--study", help="study name (default: TASK or TASK.VARIANT)")
    p.add_argument("--storage", help="Optuna storage URL, or a journal-file path")
    p.add_argument("--space", type=Path, help="search-space YAML (default: the task's own)")
    p.add_argument("--data-dir", type=Path, help="data root (default: $BENCH_DATA)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the study")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="start no trial after this many seconds (the running ones finish)")
    p.add_argument("--eval-top", type=int, metavar="N",
                   help="when done, evaluate the best N configurations on the test set")
    p.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                   help="save a running trial's state at an epoch end at most this often "
                   "(default 60; always on Ctrl-C, SIGTERM and preemption)")
    p.add_argument("--fuse", metavar="K", help="train K trials at a time as one stacked model "
                   "on the device (vae, priors, synthetic), or auto: K from the device's memory")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description=SUMMARY,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("list", help="tasks, their variants and search spaces; with TASK, "
                                    "every parameter --set takes")
    p.add_argument("task", nargs="?", help="one task: also its parameters, defaults and rules")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("validate", help="check search-space files; exit 2 listing every error")
    p.add_argument("paths", nargs="*", help="YAML files (default: every shipped space)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_validate)
    _add_run(sub)

    p = sub.add_parser("eval", help="test-set metrics of the best configurations, added to "
                       "their rows")
    p.add_argument("task")
    p.add_argument("--study", help="default: the task's search study (TASK)")
    p.add_argument("--variant")
    p.add_argument("--top", type=_at_least_1, default=3,
                   help="configurations to evaluate (default 3)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="evaluation parameters, e.g. test_size=1000 iwae_k=50")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", type=Path)
    _add_common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("rerun", help="run one trial again from its row; print both "
                       "objectives")
    p.add_argument("uid", help="the trial's trial_uid (a column of the leaderboard)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--record", action="store_true",
                   help="write its row (study <study>.rerun) into the leaderboard")
    _add_common(p)
    p.set_defaults(func=cmd_rerun)

    p = sub.add_parser("board", help="configurations ranked within each study: mean ± std "
                       "and n over seeds")
    p.add_argument("task")
    p.add_argument("--format", choices=("table", "csv", "markdown", "json"), default="table")
    p.add_argument("--top", type=_at_least_1, help="the best N configurations of each study")
    p.add_argument("--study")
    p.add_argument("--variant")
    p.add_argument("--metrics", action="append",
                   help="comma-separated metrics to show beside the objective, e.g. "
                        "test_elbo,test_iwae_ll (repeatable)")
    p.add_argument("--all-params", action="store_true",
                   help="every parameter as a column, not only those that vary")
    _add_common(p)
    p.set_defaults(func=cmd_board)

    p = sub.add_parser("compare", help="is a difference real? paired tests against the best "
                       "configuration, Holm-adjusted; Friedman and a critical-difference "
                       "diagram")
    p.add_argument("task")
    p.add_argument("--variant")
    p.add_argument("--study", action="append", help="one study, or two to compare")
    p.add_argument("--metric", help="default: the study's objective (e.g. test_elbo after "
                   "bench eval)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--minimize", action="store_true", default=None,
                   help="with --metric: lower is better")
    g.add_argument("--maximize", dest="minimize", action="store_false",
                   help="with --metric: higher is better")
    p.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    _add_common(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="one self-contained HTML page per task: boards, "
                       "comparisons, figures, budget and provenance of every study")
    p.add_argument("task")
    p.add_argument("--study", help="one study only (default: all)")
    p.add_argument("--data-dir", type=Path)
    _add_common(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("plot", help="comparison figures (PNG) from the leaderboard")
    p.add_argument("task")
    p.add_argument("--study")
    p.add_argument("--variant")
    p.add_argument("--data-dir", type=Path)
    _add_common(p)
    p.set_defaults(func=cmd_plot)

    _add_data(sub)
    from bench.launchers.slurm import add_slurm_parser

    add_slurm_parser(sub, _add_common)
    return parser


# commands that only read a leaderboard: an OSError there says nothing of a study's state
READ_ONLY = {"cmd_list", "cmd_validate", "cmd_board", "cmd_compare", "cmd_report",
             "cmd_plot"}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `bench board ... | head`
        return 0
    except OSError as exc:  # a full disk or a read-only folder under the study or the rows
        import errno

        where = f"{exc.filename}: " if exc.filename else ""
        if exc.errno in (errno.ENAMETOOLONG, errno.ENOTDIR):  # a path given is not usable
            print(f"error: {where}{exc.strerror or exc} (check --out, --storage and the "
                  "paths given)", file=sys.stderr)
            return 2
        if getattr(args.func, "__name__", "") in READ_ONLY:  # nothing of a study was touched
            print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
            return 1
        print(f"error: {where}{exc.strerror or exc}. Finished trials keep their rows; free "
              "space or fix the permissions, then rerun: the next run repairs the study",
              file=sys.stderr)
        return 1
    except Exception as exc:
        from bench.errors import storage_failure

        root = storage_failure(exc)
        if root is None:
            raise
        print(f"error: the study's storage failed: {root}. Finished trials keep their rows; "
              "free space or fix the permissions, then rerun: the next run repairs the study",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
