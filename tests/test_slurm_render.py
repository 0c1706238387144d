"""`bench slurm submit` checks every value that goes into a batch script before rendering it.

A newline in a value that lands on an `#SBATCH` line ends sbatch's directives there: what
follows runs as a command and every later `#SBATCH` line (`--requeue`, `--signal`) is
ignored. Shell lines carry values shell-quoted; here they are parsed back by bash itself.
No Slurm needed.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import bench_cli

from bench.errors import ConfigError
from bench.launchers import slurm


def options(tmp_path: Path, **kw: object) -> slurm.SubmitOptions:
    o = slurm.SubmitOptions("synthetic", trials=4, workers=2, out=tmp_path / "lb")
    return dataclasses.replace(o, **kw)  # type: ignore[arg-type]


def problems_of(o: slurm.SubmitOptions) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        slurm.render(o, 4)
    return exc.value.problems


def assert_each_named_once(problems: list[str], expected: list[tuple[str, str]]) -> None:
    """One problem per (flag, value), naming both (the value as repr: one line each)."""
    assert len(problems) == len(expected), "\n".join(problems)
    for flag, value in expected:
        hits = [p for p in problems if p.startswith(f"{flag}:") and repr(value) in p]
        assert len(hits) == 1, (flag, value, problems)
    assert all("\n" not in p for p in problems)


# ---------------------------------------------------------------- hostile values

def test_every_hostile_value_is_refused_in_one_error(tmp_path: Path) -> None:
    o = options(tmp_path, time="01:00\ntouch x", partition="gpu\ntouch y",
                sbatch_args=["--mem=8G\ntouch z", "--mem=8G --no-requeue", "-p gpu",
                             "--comment=a#b", "--mem=8G", "#SBATCH --x"],
                study="../evil", variant=".hidden", overrides=["x=1\ntouch w", "y=2"],
                data_dir=tmp_path / "d\rx", space_file=Path("s\0.yaml"),
                storage=str(tmp_path / "j\n.journal"), device="cpu\x1b[2J", sampler="tpe\t",
                pruner="none\x00")
    assert_each_named_once(problems_of(o), [
        ("--time", "01:00\ntouch x"), ("--partition", "gpu\ntouch y"),
        ("--sbatch-arg", "--mem=8G\ntouch z"), ("--sbatch-arg", "--mem=8G --no-requeue"),
        ("--sbatch-arg", "-p gpu"), ("--sbatch-arg", "--comment=a#b"),
        ("--sbatch-arg", "#SBATCH --x"),
        ("--study", "../evil"), ("--variant", ".hidden"), ("--set", "x=1\ntouch w"),
        ("--data-dir", str(tmp_path / "d\rx")), ("--space", "s\0.yaml"),
        ("--storage", str(tmp_path / "j\n.journal")), ("--device", "cpu\x1b[2J"),
        ("--sampler", "tpe\t"), ("--pruner", "none\x00")])


def test_messages_state_the_rule(tmp_path: Path) -> None:
    (time_, part, arg, study, out) = problems_of(options(  # in this order
        tmp_path, time="1h", partition="a b", sbatch_args=["--x y"], study="a/b",
        out=tmp_path / "no\nout"))
    assert time_ == ("--time: must be Slurm's time format (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, "
                     "D-HH:MM:SS) or UNLIMITED, got '1h'")
    assert "comma-separated list of partition names" in part
    assert "one long option, --name or --name=value" in arg
    assert "letters, digits" in study and "'..'" in study
    assert out.startswith("--out: must not contain control characters") and "\\n" in out


def test_a_task_name_must_be_registered(tmp_path: Path) -> None:
    (p,) = problems_of(options(tmp_path, task="nope\ntouch x"))
    assert "unknown task 'nope\\ntouch x'" in p and "synthetic" in p  # lists the known ones


def test_exported_bench_variables_are_checked(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_EVIL", "a\ntouch x")
    (p,) = problems_of(options(tmp_path))
    assert p == "environment BENCH_EVIL: must not contain control characters (newline, CR, " \
                "NUL, ...), got 'a\\ntouch x'"


def test_log_folder_on_an_sbatch_line_cannot_hold_spaces(tmp_path: Path) -> None:
    (p,) = problems_of(options(tmp_path, out=tmp_path / "my results"))
    assert p.startswith("--out: the Slurm log folder OUT/TASK/slurm goes into '#SBATCH "
                        "--output='")
    assert p.endswith(f"got {str(tmp_path.resolve() / 'my results' / 'synthetic' / 'slurm')!r}")


def test_percent_in_the_log_folder_is_escaped_for_sbatch(tmp_path: Path) -> None:
    out = tmp_path / "100%x"
    script = slurm.render(options(tmp_path, out=out), 4)
    assert f"#SBATCH --output={tmp_path.resolve()}/100%%x/synthetic/slurm/%x-%A_%a.out" in script
    assert f"--out {out.resolve()} " in script  # a shell line: no escaping there


@pytest.mark.parametrize("value", ["30", "30:00", "01:00:00", "2-0", "2-12:30", "2-12:30:15",
                                   "UNLIMITED", "infinite"])
def test_slurm_time_formats_pass(tmp_path: Path, value: str) -> None:
    assert "#SBATCH --time=" + value in slurm.render(options(tmp_path, time=value), 4)


@pytest.mark.parametrize("value", ["", "1h", "01:00:00:00", "1-", "-1", "01:00\n", " 30",
                                   "1-2-3", "٣٠"])
def test_malformed_times_fail(tmp_path: Path, value: str) -> None:
    (p,) = problems_of(options(tmp_path, time=value))
    assert p.startswith("--time: must be Slurm's time format")


@pytest.mark.parametrize("value", ["gpu", "gpu,cpu", "a100_80g.x-1"])
def test_partitions_pass(tmp_path: Path, value: str) -> None:
    assert f"#SBATCH --partition={value}\n" in slurm.render(options(tmp_path, partition=value), 4)


@pytest.mark.parametrize("value", ["--mem=8G", "--exclusive", "--gres=gpu:a100:2",
                                   "--nodelist=node[01-04]", "--mail-user=a@b.org"])
def test_single_long_options_pass(tmp_path: Path, value: str) -> None:
    assert f"#SBATCH {value}\n" in slurm.render(options(tmp_path, sbatch_args=[value]), 4)


@pytest.mark.parametrize("value", ["vae", "vae.beta-sweep", "A_1", "x" * 100])
def test_names_pass(value: str) -> None:
    assert slurm.check_name("--study", value) is None


@pytest.mark.parametrize("value", ["", ".x", "..", "a..b", "a/b", "/abs", "a\nb", "-x", "a b",
                                   "x" * 101, "é"])
def test_names_fail(value: str) -> None:
    p = slurm.check_name("--variant", value)
    assert p is not None and p.startswith("--variant: must be") and repr(value) in p


# ---------------------------------------------------------------- the command line

def test_cli_refuses_injection_before_writing_anything(tmp_path: Path) -> None:
    """Not a dry run: refused before the study is created (and before sbatch is looked for)."""
    out = tmp_path / "lb"
    r = bench_cli("slurm", "submit", "synthetic", "--trials", "2", "--out", str(out),
                  "--time", "01:00\ntouch x", "--sbatch-arg", "--mem=1G\ntouch y",
                  "--partition", "debug\ntouch z", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("error: --time: "), r.stderr
    assert "'--mem=1G\\ntouch y'" in r.stderr and "'debug\\ntouch z'" in r.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_dry_run_checks_task_and_out(tmp_path: Path) -> None:
    out = str(tmp_path / "a\nb")
    r = bench_cli("slurm", "submit", "no\ntask", "--out", out, "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert "unknown task 'no\\ntask'; known tasks:" in r.stderr
    assert f"--out: must not contain control characters (newline, CR, NUL, ...), got " \
           f"{out!r}" in r.stderr
    assert "#SBATCH" not in r.stderr


def test_cli_dry_run_plans_the_run_as_a_submission_does(tmp_path: Path) -> None:
    out = tmp_path / "lb"
    r = bench_cli("slurm", "submit", "brain-age", "--out", str(out), "--set", "moments=2",
                  "--set", "normalize=none", "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert "every point of the searched space" in r.stderr and "moments: powers" in r.stderr
    assert not out.exists()
    # a valid one prints its script and reads, generates and writes no data
    cache = tmp_path / "cache"
    r = bench_cli("slurm", "submit", "brain-age", "--out", str(out), "--dry-run", cwd=tmp_path,
                  env={"BENCH_CACHE": str(cache)})
    assert r.returncode == 0 and "#SBATCH" in r.stdout, r.stderr
    assert not out.exists() and not cache.exists()


# ---------------------------------------------------------------- quoting of benign values

AWKWARD_SET = """label=it's "quoted" $HOME `id` \\ ; & | *"""


def awkward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **kw: object
            ) -> tuple[slurm.SubmitOptions, Path, Path]:
    data_dir, bench_data = tmp_path / "data dir $x", tmp_path / "my data 'd'"
    monkeypatch.setenv("BENCH_DATA", str(bench_data))
    monkeypatch.setenv("BENCH_NOTE", "it's \"fine\"; $(id)")
    o = options(tmp_path, data_dir=data_dir, overrides=[AWKWARD_SET], **kw)
    return o, data_dir, bench_data


def shell_command(script: str, start: str) -> list[str]:
    """The shell words of the (continued) line of `script` that begins with `start`."""
    text = script[script.index("\n" + start) + 1:]
    line = text.split("\n")[0]
    while line.endswith("\\"):
        text = text.split("\n", 1)[1]
        line = line[:-1] + text.split("\n")[0]
    return shlex.split(line)


def test_awkward_values_reach_the_worker_intact(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the rendered array script with a stub `srun`: bash itself parses every line and
    the worker's argv and environment come out exactly as given."""
    o, data_dir, bench_data = awkward(tmp_path, monkeypatch)
    script = slurm.render(o, 4)
    job = tmp_path / "job.sbatch"
    job.write_text(script)
    assert subprocess.run(["bash", "-n", str(job)]).returncode == 0
    lb = (tmp_path / "lb").resolve()
    expected = [sys.executable, "-m", "bench.cli", "run", "synthetic", "--out", str(lb),
                "--storage", str(lb / "synthetic" / "optuna.journal"),
                "--data-dir", str(data_dir.resolve()), "--set", AWKWARD_SET]
    words = shell_command(script, "srun ")
    assert words[3:3 + len(expected)] == expected

    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "srun").write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$STUB_ARGV"\n'
                                'printf "%s\\0" "$BENCH_DATA" "$BENCH_NOTE" > "$STUB_ENV"\n')
    (stubs / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_JOB_ID": "123",
           "SLURM_ARRAY_TASK_ID": "0", "STUB_ARGV": str(tmp_path / "argv"),
           "STUB_ENV": str(tmp_path / "env")}
    r = subprocess.run(["bash", str(job)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    argv = (tmp_path / "argv").read_text().split("\0")[:-1]
    assert argv == ["--ntasks=1", "--cpus-per-task=1", *expected,
                    "--trials", "2", "--worker-id", "123-0", "--quiet"]
    assert (tmp_path / "env").read_text().split("\0")[:-1] == [
        str(bench_data.resolve()), "it's \"fine\"; $(id)"]
    assert not (tmp_path / "x").exists()


def test_awkward_values_in_ray_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = tmp_path / "ray results 'r'"
    o, data_dir, _ = awkward(tmp_path, monkeypatch, mode="ray", storage=str(storage),
                             study="s.1")
    script = slurm.render(o, 6)
    job = tmp_path / "ray.sbatch"
    job.write_text(script)
    assert subprocess.run(["bash", "-n", str(job)]).returncode == 0
    lb = (tmp_path / "lb").resolve()
    words = shell_command(script, f"{shlex.quote(sys.executable)} -m bench.cli run")
    assert words[:14] == [sys.executable, "-m", "bench.cli", "run", "synthetic", "--out",
                          str(lb), "--storage", str(storage), "--study", "s.1",
                          "--data-dir", str(data_dir.resolve()), "--set"]
    assert words[14] == AWKWARD_SET
    assert shell_command(script, "experiment=")[0] == f"experiment={storage}/s.1"


@pytest.mark.parametrize("gpus", [float("nan"), float("inf"), -1.0, 0.5])
def test_gpus_per_worker_must_be_whole_and_finite(tmp_path: Path, gpus: float) -> None:
    (p,) = problems_of(options(tmp_path, gpus_per_worker=gpus))  # nan once raised ValueError
    assert p.startswith("--gpus-per-worker: a whole number >= 0")


def test_a_journal_storage_url_reaches_every_worker_as_an_absolute_path(tmp_path: Path,
                                                                       monkeypatch) -> None:
    """`--storage journal:PATH` (README's form) and a bare PATH are the same journal file,
    made absolute; the prefix is not taken for part of a relative path."""
    monkeypatch.chdir(tmp_path)
    want = f"journal:{tmp_path / 'sj' / 'x.journal'}"
    assert slurm.optuna_storage(options(tmp_path, storage="journal:sj/x.journal")) == want
    assert slurm.optuna_storage(options(tmp_path, storage="sj/x.journal")) == want[8:]
    args = shlex.split(slurm.run_args(options(tmp_path, storage="journal:sj/x.journal")))
    assert args[args.index("--storage") + 1] == want
    pg = "postgresql://u:p@h/db"
    assert slurm.optuna_storage(options(tmp_path, storage=pg)) == pg


def test_submit_checks_the_device_and_dry_run_shows_the_submitted_total(
        tmp_path: Path) -> None:
    out = str(tmp_path / "lb")
    bad = bench_cli("slurm", "submit", "synthetic", "--out", out, "--device", "gpu",
                    cwd=tmp_path)
    assert bad.returncode == 2 and "--device: must be auto, cpu, cuda" in bad.stderr
    assert not Path(out).exists()
    for extra, total in ((["--variant", "grid"], 12), ([], 20)):  # no --trials: the default
        dry = bench_cli("slurm", "submit", "synthetic", "--out", out, "--dry-run", *extra,
                        cwd=tmp_path)
        assert dry.returncode == 0, dry.stderr
        assert f"quota=$(( {total} / 1 " in dry.stdout
    assert not Path(out).exists()


def test_status_of_a_study_that_does_not_exist_exits_2_and_creates_nothing(
        tmp_path: Path) -> None:
    out = tmp_path / "lb"
    res = bench_cli("slurm", "status", "synthetic", "--out", str(out), "--study", "typo",
                    cwd=tmp_path)
    assert res.returncode == 2 and "no study 'typo' in journal:" in res.stderr, res.stderr
    assert not out.exists()
