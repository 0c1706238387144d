"""What may go into an sbatch script: every rule a value of `bench slurm submit` must obey
before it is written into a batch script (no control characters anywhere, Slurm's own
formats for `--time` and `--partition`, one long option per `--sbatch-arg`)."""

from __future__ import annotations

import re
import unicodedata

from bench.names import name_problem

TIME_RE = re.compile(r"[0-9]+(:[0-9]+){0,2}|[0-9]+-[0-9]+(:[0-9]+){0,2}")
PARTITION_RE = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*")
# sbatch splits a #SBATCH line at whitespace, reads quotes and backslashes, ends it at '#'
SBATCH_ARG_RE = re.compile(r"--[A-Za-z][A-Za-z0-9_-]*(=[^\s'\"\\#]+)?")
DIRECTIVE_UNSAFE_RE = re.compile(r"[\s'\"\\#]")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
NO_CONTROL = "must not contain control characters (newline, CR, NUL, ...)"


def has_control(value: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in value)


def check_name(flag: str, value: str) -> str | None:
    """A study or variant name: one safe path component (no `/`, no leading `.`, no `..`)."""
    problem = name_problem(value)
    return f"{flag}: {problem}" if problem else None


def check_plain(flag: str, value: str) -> str | None:
    return f"{flag}: {NO_CONTROL}, got {value!r}" if has_control(value) else None


def check_time(value: str) -> str | None:
    if value.lower() in ("unlimited", "infinite") or TIME_RE.fullmatch(value):
        return None
    return ("--time: must be Slurm's time format (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, "
            f"D-HH:MM:SS) or UNLIMITED, got {value!r}")


def check_partition(value: str) -> str | None:
    if PARTITION_RE.fullmatch(value):
        return None
    return ("--partition: must be a comma-separated list of partition names of "
            f"A-Z a-z 0-9 _ . -, got {value!r}")


def check_sbatch_arg(value: str) -> str | None:
    if SBATCH_ARG_RE.fullmatch(value):
        return None
    return ("--sbatch-arg: must be one long option, --name or --name=value, without "
            "whitespace, quotes, backslashes, '#' or control characters (sbatch splits a "
            f"#SBATCH line at whitespace and ends it at '#'), got {value!r}")


def check_env(name: str, value: str) -> str | None:
    if not ENV_NAME_RE.fullmatch(name):
        return f"environment: {name!r} is exported to the job, and must be a shell name"
    return check_plain(f"environment {name}", value)
