"""`bench slurm submit|status`: render a template from `slurm/`, submit it with sbatch.

- `--mode optuna` (default): a job array of `--workers` tasks, each a `bench run --worker-id
  <array job>-<index>` sharing one study (a journal file under `--out` by default, which
  must be on a file system every node sees, or a postgresql:// URL). Worker i's quota is
  its share of `--trials` (the first N % K run one more), and a slot counts the trials it
  has finished in total, so the array finishes exactly N trials however often it is
  preempted. `--requeue` and `--signal=USR2@90`: a warned worker suspends its running
  trial (the objective saves its state), exits 75 and requeues itself; when it comes back
  it resumes that trial from its state, intermediate values kept.
- `--mode ray`: one allocation of `--workers` nodes, a Ray head and workers started with
  srun on per-job ports, then `bench run --backend ray --address ...` (`--resume` after a
  requeue).

The study is created (and an enumerated variant's trials enqueued) here, before sbatch,
so array tasks starting together never race to do it. `--dry-run` plans the run as a
submission does (every check of `bench run` but the data's: it reads, downloads or
generates no data set) and prints the script; it creates and submits nothing.

Every value that goes into a script is checked first (`check`), dry run or not: shell lines
carry values through `shlex.quote`; `#SBATCH` lines cannot be shell-quoted, and sbatch stops
reading directives at the first line that is not one, so their values must match Slurm's
own syntax (a newline there would end the directives and run what follows as a command).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import BenchError, ConfigError, UnknownTaskError
from bench.launchers.sbatch_rules import (
    DIRECTIVE_UNSAFE_RE,
    check_env,
    check_name,
    check_partition,
    check_plain,
    check_sbatch_arg,
    check_time,
    has_control,
)

MODES = ("optuna", "ray")
SIGNAL_S = 90  # USR2 this long before the time limit: time to finish a step and save
# A job requeues itself with scontrol, which fails when the controller does not answer within
# MessageTimeout (a busy controller): it retries, 5 tries 2-16 s apart (30 s of waiting, in
# SIGNAL_S), then says so; the job then ends with the worker's own exit status (75: FAILED,
# not COMPLETED), and the suspended trial resumes at the study's next run.
REQUEUE_SELF = r"""requeue_self() {  # scontrol requeue, retried while the controller is silent
    local try
    for try in 1 2 3 4 5; do
        scontrol requeue "$SLURM_JOB_ID" && return 0
        [ "$try" -lt 5 ] || break
        echo "bench: scontrol requeue $SLURM_JOB_ID failed (try $try of 5); retrying" \
            "in $(( 1 << try )) s"
        sleep $(( 1 << try ))
    done
    echo "bench: could not requeue job $SLURM_JOB_ID (scontrol failed 5 times); its" \
        "suspended trial resumes when the study runs again (bench run or slurm submit)"
    return 1
}"""


@dataclass
class SubmitOptions:
    task: str
    trials: int | None = None
    workers: int = 1
    mode: str = "optuna"
    gpus_per_worker: float = 0
    cpus_per_worker: int = 1
    time: str = "01:00:00"
    partition: str | None = None
    storage: str | None = None
    study: str | None = None
    variant: str | None = None
    sampler: str | None = None
    pruner: str | None = None
    seed: int | None = None
    overrides: list[str] = field(default_factory=list)
    space_file: Path | None = None
    data_dir: Path | None = None
    device: str | None = None
    gpus_per_trial: float | None = None
    cpus_per_trial: float | None = None
    sbatch_args: list[str] = field(default_factory=list)
    out: Path = Path("leaderboards")
    dry_run: bool = False


def templates_dir() -> Path:
    env = os.environ.get("BENCH_SLURM_TEMPLATES")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "slurm"


def fill(template: str, values: dict[str, Any]) -> str:
    """Replace every `{{name}}`; a name without a value is an error, not an empty string."""
    missing = sorted(set(re.findall(r"\{\{(\w+)\}\}", template)) - set(values))
    if missing:
        raise ConfigError(f"slurm template: no value for {', '.join(missing)}")
    return re.sub(r"\{\{(\w+)\}\}", lambda m: str(values[m.group(1)]), template)


def _abs(p: Path | str) -> Path:
    return Path(p).expanduser().resolve()


def optuna_storage(o: SubmitOptions) -> str:
    """The storage every worker opens: a URL as given, a journal file (`PATH` or
    `journal:PATH`) made absolute, or the default journal beside the leaderboard."""
    if not o.storage:
        return default_storage(o)
    if "://" in o.storage:
        return o.storage
    if o.storage.startswith("journal:"):
        return f"journal:{_abs(o.storage.removeprefix('journal:'))}"
    return str(_abs(o.storage))


def default_storage(o: SubmitOptions) -> str:
    """A journal file beside the leaderboard (as `bench run --workers N` uses)."""
    return str(_abs(o.out) / o.task / "optuna.journal")


# ---------------------------------------------------------------- checks of script values

def _check_task(task: str) -> str | None:
    try:
        from bench.registry import get_task

        get_task(task)
    except UnknownTaskError as exc:
        return f"TASK: {exc}"
    return None


def _check_log_dir(o: SubmitOptions) -> str | None:
    """The log folder goes into `#SBATCH --output=`, where shell quoting does not apply.
    (Control characters are reported for the value they came from: --out, TASK, the cwd.)"""
    if has_control(str(o.out)) or has_control(o.task):
        return None  # and resolve() cannot take a NUL
    log_dir = str(log_folder(o))
    if has_control(log_dir) or not DIRECTIVE_UNSAFE_RE.search(log_dir):
        return None
    return ("--out: the Slurm log folder OUT/TASK/slurm goes into '#SBATCH --output=', which "
            "sbatch does not shell-parse: it must not contain whitespace, quotes, backslashes "
            f"or '#' (choose another --out), got {log_dir!r}")


def _free_values(o: SubmitOptions) -> list[tuple[str, str]]:
    """(where from, value) of every free-form value the script carries, shell-quoted."""
    pairs = [(flag, str(v)) for flag, v in (
        ("--out", o.out), ("--storage", o.storage), ("--sampler", o.sampler),
        ("--pruner", o.pruner), ("--device", o.device), ("--space", o.space_file),
        ("--data-dir", o.data_dir)) if v is not None]
    pairs += [("--set", pair) for pair in o.overrides]
    return pairs + [("working directory", os.getcwd()), ("python", sys.executable),
                    ("ray executable", ray_executable())]


def script_problems(o: SubmitOptions) -> list[str]:
    """Every value the rendered script would carry that breaks a rule, one message each."""
    found = [_check_task(o.task), check_time(o.time)]
    found += [check_partition(o.partition)] if o.partition is not None else []
    found += [check_sbatch_arg(a) for a in o.sbatch_args]
    found += [check_name(flag, v) for flag, v in (("--study", o.study), ("--variant", o.variant))
              if v is not None]
    found += [check_plain(flag, value) for flag, value in _free_values(o)]
    found += [_check_log_dir(o)] + [check_env(k, v) for k, v in sorted(bench_env().items())]
    return [p for p in found if p is not None]


def check(o: SubmitOptions) -> None:
    """Raise one ConfigError listing every problem: options, then the script's values."""
    errs = []
    if o.mode not in MODES:
        errs.append(f"--mode: must be one of {', '.join(MODES)}, got {o.mode!r}")
    if o.workers < 1:
        errs.append(f"--workers: must be >= 1, got {o.workers}")
    if o.trials is not None and o.trials < 1:
        errs.append(f"--trials: must be >= 1, got {o.trials}")
    if not (0 <= o.gpus_per_worker < math.inf) or o.gpus_per_worker != int(o.gpus_per_worker):
        errs.append(f"--gpus-per-worker: a whole number >= 0 (Slurm allocates whole GPUs; "
                    f"share them with --gpus-per-trial in ray mode), got {o.gpus_per_worker}")
    if o.cpus_per_worker < 1:
        errs.append(f"--cpus-per-worker: must be >= 1, got {o.cpus_per_worker}")
    if o.storage and o.storage.startswith("sqlite"):
        errs.append(f"--storage {o.storage!r}: SQLite cannot take concurrent workers on several "
                    "nodes; use a journal file on a shared file system or postgresql://...")
    if o.mode == "optuna" and (o.gpus_per_trial or o.cpus_per_trial):
        errs.append("--gpus-per-trial/--cpus-per-trial: ray mode only (optuna mode runs one "
                    "trial at a time per worker with the worker's resources)")
    errs += script_problems(o)
    if o.device is not None and not any(e.startswith("--device") for e in errs):
        from bench.plan import device_problem  # spelling only: the nodes have the devices

        problem = device_problem(o.device, here=False)
        if problem:
            errs.append(f"--device: {problem}")
    if errs:
        raise ConfigError(errs)


def run_args(o: SubmitOptions) -> str:
    """The `bench run` arguments every worker shares."""
    args = [o.task, "--out", str(_abs(o.out))]
    if o.mode == "optuna":
        args += ["--storage", optuna_storage(o)]
    elif o.storage:
        args += ["--storage", o.storage]
    for flag, value in (("--study", o.study), ("--variant", o.variant),
                        ("--sampler", o.sampler), ("--pruner", o.pruner), ("--seed", o.seed),
                        ("--device", o.device)):
        if value is not None:
            args += [flag, str(value)]
    for flag, path in (("--space", o.space_file), ("--data-dir", o.data_dir)):
        if path is not None:
            args += [flag, str(_abs(path))]
    for pair in o.overrides:
        args += ["--set", pair]
    return " ".join(shlex.quote(a) for a in args)


def bench_env() -> dict[str, str]:
    """The BENCH_* variables the job exports (its data and spaces folders made absolute)."""
    keep = {k: v for k, v in os.environ.items() if k.startswith("BENCH_") and k != "BENCH_OUT"}
    for k in ("BENCH_DATA", "BENCH_SPACES"):
        if k in keep:
            keep[k] = str(_abs(keep[k]))
    return keep


def _env_lines() -> str:
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(bench_env().items()))


def ray_executable() -> str:
    bin_dir = Path(sys.executable).parent
    return str(bin_dir / "ray") if (bin_dir / "ray").exists() else shutil.which("ray") or "ray"


def log_folder(o: SubmitOptions) -> Path:
    return _abs(o.out) / o.task / "slurm"


def ray_experiment(o: SubmitOptions) -> str:
    """Where `bench run --backend ray` keeps this run's experiment (see backends/ray.py)."""
    study = o.study or (f"{o.task}.{o.variant}" if o.variant else o.task)
    root = o.storage or str(_abs(o.out) / o.task / "ray")
    return f"{root.rstrip('/')}/{study}"


def render(o: SubmitOptions, trials: int) -> str:
    check(o)
    lines = [f"#SBATCH --partition={o.partition}"] if o.partition else []
    if o.gpus_per_worker:
        lines.append(f"#SBATCH --gres=gpu:{int(o.gpus_per_worker)}")
    lines += [f"#SBATCH {a}" for a in o.sbatch_args]
    ray_args = []
    if o.gpus_per_trial is not None:
        ray_args += ["--gpus-per-trial", f"{o.gpus_per_trial:g}"]
    if o.cpus_per_trial is not None:
        ray_args += ["--cpus-per-trial", f"{o.cpus_per_trial:g}"]
    values = {
        "job_name": f"bench-{o.task}", "workers": o.workers, "last_index": o.workers - 1,
        "trials": trials, "cpus": o.cpus_per_worker, "gpus": int(o.gpus_per_worker),
        "time": o.time, "signal_s": SIGNAL_S,
        "log_dir": str(log_folder(o)).replace("%", "%%"),  # a literal % in sbatch's --output
        "sbatch_lines": "\n".join(lines), "workdir": shlex.quote(os.getcwd()),
        "env_lines": _env_lines(), "python": shlex.quote(sys.executable),
        "ray": shlex.quote(ray_executable()),
        "run_args": run_args(o), "ray_args": " ".join(ray_args),
        "ray_experiment": shlex.quote(ray_experiment(o)), "requeue_self": REQUEUE_SELF,
    }
    name = "optuna-array.sbatch" if o.mode == "optuna" else "ray.sbatch"
    return fill((templates_dir() / name).read_text(), values)


def _plan(o: SubmitOptions, check_data: bool = True) -> Any:
    """The run as `bench run` would plan it (every check before anything is submitted;
    `check_data=False`: all but the data's, which may read or generate a data set)."""
    from bench.plan import RunOptions, make_plan
    from bench.registry import get_task
    from bench.space import parse_overrides

    storage = optuna_storage(o) if o.mode == "optuna" else None
    opts = RunOptions(task=o.task, trials=o.trials, variant=o.variant,
                      sampler=o.sampler or "tpe", pruner=o.pruner, seed=o.seed or 0,
                      overrides=parse_overrides(o.overrides, get_task(o.task)),
                      study=o.study, storage=storage, out=_abs(o.out), workers=o.workers,
                      space_file=o.space_file, data_dir=o.data_dir, backend=o.mode,
                      extra={"worker_id": "submit"} if o.mode == "optuna" else {})
    return make_plan(opts, check_data=check_data)


def prepare(o: SubmitOptions) -> int:
    """Validate the run as `bench run` would, create the study, enqueue a variant's trials;
    returns the number of trials the job will finish."""
    from bench.backends._base import get_backend

    plan = _plan(o)  # ConfigError before anything is submitted
    for note in plan.notes:  # e.g. part of the space breaks a rule: said once, here
        print(note, file=sys.stderr)
    if o.mode != "optuna":
        return o.trials if o.trials is not None else plan.default_total()
    n = get_backend("optuna").prepare(plan)
    if n == 0:
        raise ConfigError(f"study {plan.study_name!r} already has its "
                          f"{o.trials if o.trials is not None else plan.default_total()} "
                          "trials; --trials N for a larger total")
    return n


def sbatch(script: str, script_path: Path) -> str:
    exe = shutil.which("sbatch")
    if exe is None:
        raise BenchError("sbatch not found: Slurm's client is not installed here "
                         "(slurm/local-cluster.sh starts a one-node Slurm on this machine)")
    script_path.parent.mkdir(parents=True, exist_ok=True)
    script_path.write_text(script)
    out = subprocess.run([exe, "--parsable", str(script_path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise BenchError(f"sbatch {script_path} failed: {out.stderr.strip() or out.stdout}")
    return out.stdout.strip().split(";")[0]


def submit(o: SubmitOptions) -> str:
    """Render, prepare the study and submit; returns the job id (the script if dry_run)."""
    check(o)  # before the study is created: a refused submission leaves nothing behind
    if o.dry_run:  # checked as a submission is, but the data (a login node need not hold
        plan = _plan(o, check_data=False)  # it); nothing created or submitted
        for note in plan.notes:
            print(note, file=sys.stderr)
        # the total a submission asks for (one that finds the study begun runs the rest)
        return render(o, o.trials if o.trials is not None else plan.default_total())
    n = prepare(o)
    script = render(o, n)
    log_folder(o).mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    job = sbatch(script, log_folder(o) / f"{o.mode}-{stamp}.sbatch")
    if o.mode == "optuna":
        _record_job(o, job, n)
    return job


def _record_job(o: SubmitOptions, job: str, n: int) -> None:
    from bench.backends.optuna import open_study  # a launcher sits above the backends

    open_study(_plan(o)).set_user_attr(f"slurm_job_{job}", {"trials": n, "workers": o.workers})


def status(o: SubmitOptions) -> str:
    """Trials of the study by state and by worker slot, plus what squeue says of the jobs."""
    from optuna.trial import TrialState

    from bench.backends.optuna import open_study, study_exists

    plan = _plan(o, check_data=False)
    if not study_exists(plan):  # a typo must not create the study it names
        raise ConfigError(f"no study {plan.study_name!r} in {plan.storage_url}: --study names "
                          "a study that `bench slurm submit` created (with the same --out, "
                          "--storage and --variant)")
    study = open_study(plan)
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    lines = [f"study {plan.study_name!r} in {plan.storage_url}: "
             + ", ".join(f"{states.get(s, 0)} {s}" for s in
                         ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING"))]
    suspended = [t.number for t in trials
                 if t.state == TrialState.RUNNING and t.user_attrs.get("suspended")]
    if suspended:
        lines.append(f"suspended (to be resumed by their worker): trials {suspended}")
    for key, job in sorted(study.user_attrs.items()):
        if not key.startswith("slurm_job_"):
            continue
        jid = key.removeprefix("slurm_job_")
        mine = [t for t in trials if str(t.user_attrs.get("worker_id", "")).startswith(f"{jid}-")]
        done = sum(t.state.is_finished() for t in mine)
        lines.append(f"job {jid}: {done}/{job['trials']} trials finished by {job['workers']} "
                     f"workers, {sum(t.state == TrialState.RUNNING for t in mine)} running")
    lines += _squeue(o.task)
    return "\n".join(lines)


def _squeue(task: str) -> list[str]:
    exe = shutil.which("squeue")
    if exe is None:
        return []
    out = subprocess.run([exe, "--noheader", "--name", f"bench-{task}", "--format",
                          "%i %T %M %R"], capture_output=True, text=True)
    rows = out.stdout.strip().splitlines()
    return ["squeue: " + r for r in rows] if out.returncode == 0 else []


# ---------------------------------------------------------------- command line

def _options(args: argparse.Namespace) -> SubmitOptions:
    keys = {f.name for f in SubmitOptions.__dataclass_fields__.values()}
    return SubmitOptions(**{k: v for k, v in vars(args).items() if k in keys and v is not None})


def cmd_submit(args: argparse.Namespace) -> int:
    result = submit(_options(args))
    print(result)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    print(status(_options(args)))
    return 0


def add_slurm_parser(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    slurm = sub.add_parser("slurm", help="run a study as Slurm jobs").add_subparsers(
        dest="slurm_command", required=True)
    p = slurm.add_parser("submit", help="render slurm/<mode> template, sbatch it, print job id")
    p.add_argument("task")
    p.add_argument("--trials", type=int, help="trials the job finishes in total (default 20; "
                   "a variant: all missing)")
    p.add_argument("--workers", type=int, default=1, help="array tasks (optuna) or nodes (ray)")
    p.add_argument("--mode", choices=MODES, default="optuna")
    p.add_argument("--gpus-per-worker", type=float, default=0)
    p.add_argument("--cpus-per-worker", type=int, default=1)
    p.add_argument("--time", default="01:00:00", help="per worker (sbatch --time)")
    p.add_argument("--partition")
    p.add_argument("--sbatch-arg", dest="sbatch_args", action="append", default=[],
                   metavar="ARG", help="extra #SBATCH line, e.g. --sbatch-arg=--mem=8G")
    p.add_argument("--gpus-per-trial", type=float, help="ray mode: GPUs per trial")
    p.add_argument("--cpus-per-trial", type=float, help="ray mode: CPUs per trial")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    _add_run_flags(p)
    add_common(p)
    p.set_defaults(func=cmd_submit)
    p = slurm.add_parser("status", help="the study's progress across workers and jobs")
    p.add_argument("task")
    p.add_argument("--mode", choices=MODES, default="optuna")
    _add_run_flags(p)
    add_common(p)
    p.set_defaults(func=cmd_status)


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", help="journal-file path on a shared file system (default "
                   "OUT/TASK/optuna.journal) or postgresql://...")
    p.add_argument("--study")
    p.add_argument("--variant")
    p.add_argument("--sampler")
    p.add_argument("--pruner")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--space", dest="space_file", type=Path)
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--device")
