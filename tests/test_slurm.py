"""`bench slurm`: rendered scripts (no Slurm needed), then real jobs on a running controller.

The `slurm` tests need a controller that answers `sinfo` (slurm/local-cluster.sh starts a
one-node cluster as root); they skip cleanly without one. The jobs run the synthetic task
in the test's temporary folder, which the local node shares.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import bench_cli

from bench import leaderboard
from bench.launchers import slurm

TIMEOUT_S = 300


def slurm_up() -> bool:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "--noheader", "-o", "%T"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s.rstrip("*~#") in ("idle", "mixed", "allocated")
                                       for s in out.stdout.split())


slurm_running = pytest.mark.skipif(not slurm_up(), reason="no Slurm controller answers "
                                   "sinfo (run slurm/local-cluster.sh as root)")


# ---------------------------------------------------------------- rendering: no Slurm needed

def test_dry_run_renders_array_with_preemption(tmp_path: Path) -> None:
    o = slurm.SubmitOptions("synthetic", trials=10, workers=4, out=tmp_path / "lb",
                            overrides=["epochs=2"], partition="gpu", gpus_per_worker=1)
    script = slurm.submit(dataclass_replace(o, dry_run=True))
    assert "#SBATCH --array=0-3" in script
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=USR2@90" in script
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --gres=gpu:1" in script
    assert "quota=$(( 10 / 4 + (i < 10 % 4 ? 1 : 0) ))" in script
    assert f"--storage {tmp_path / 'lb' / 'synthetic' / 'optuna.journal'}" in script
    assert "--worker-id" in script and "scontrol requeue" in script
    assert "{{" not in script
    # the quotas the script computes add up to the total, for any split
    for n, k in ((10, 4), (8, 4), (3, 5), (1, 1)):
        assert sum(n // k + (1 if i < n % k else 0) for i in range(k)) == n
    # bash accepts it
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_dry_run_ray_mode_per_job_ports(tmp_path: Path) -> None:
    o = slurm.SubmitOptions("synthetic", trials=6, workers=2, mode="ray", gpus_per_worker=2,
                            gpus_per_trial=0.5, out=tmp_path / "lb", dry_run=True)
    script = slurm.submit(o)
    assert "#SBATCH --nodes=2" in script and "--backend ray" in script
    assert "--gpus-per-trial 0.5" in script and "--num-gpus=2" in script
    assert "--resume" in script
    start, mod, block = map(int, re.search(
        r"base=\$\(\( (\d+) \+ \(SLURM_JOB_ID % (\d+)\) \* (\d+) \)\)", script).groups())
    ports = {start + (job % mod) * block + k for job in range(5000) for k in (0, block - 1)}
    assert 1024 <= min(ports) and max(ports) < 32768, "every job's ports under the ephemeral range"
    path = tmp_path / "ray.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_submit_rejects_bad_options_all_at_once(tmp_path: Path) -> None:
    r = bench_cli("slurm", "submit", "synthetic", "--workers", "0", "--gpus-per-worker", "0.5",
                  "--storage", "sqlite:///x.db", "--out", str(tmp_path), "--dry-run")
    assert r.returncode == 2, r.stderr
    for text in ("--workers", "--gpus-per-worker", "SQLite"):
        assert text in r.stderr


def dataclass_replace(o: slurm.SubmitOptions, **kw: object) -> slurm.SubmitOptions:
    import dataclasses

    return dataclasses.replace(o, **kw)  # type: ignore[arg-type]


def test_worker_slot_suspends_on_usr2_and_resumes_without_slurm(tmp_path: Path) -> None:
    """The mechanism under the Slurm jobs, with plain processes: SIGUSR2 mid-trial makes
    the slot save its trial and exit 75; the same command resumes that trial and finishes
    the slot's quota exactly."""
    import sys

    out, journal = tmp_path / "lb", tmp_path / "study.journal"
    cmd = [sys.executable, "-m", "bench.cli", "run", "synthetic", "--storage", str(journal),
           "--worker-id", "w0", "--trials", "2", "--pruner", "none", "--set", "sleep_s=0.5",
           "--set", "epochs=6", "--out", str(out), "--quiet"]
    suspend_mid_trial(cmd, journal)
    assert not leaderboard.read_trials(out, "synthetic").shape[0]  # nothing finished yet
    (t,) = journal_trials(journal)
    assert t.state.name == "RUNNING" and t.user_attrs["suspended"] is True
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr
    trials = journal_trials(journal)
    assert len(trials) == 2 and all(x.state.name == "COMPLETE" for x in trials)
    assert sorted(trials[0].intermediate_values) == list(range(6))
    rows = leaderboard.read_trials(out, "synthetic").set_index("trial_uid")
    assert len(rows) == 2
    assert rows.loc[trials[0].user_attrs["bench"]["uid"], "attempts"] == 2


def suspend_mid_trial(cmd: list[str], journal: Path) -> None:
    """Start a worker slot, send it SIGUSR2 once a trial has reported an epoch, and check
    that it saved that trial and exited 75 (what its Slurm job requeues on)."""
    import os
    import signal

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ})
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and any(t.state.name == "RUNNING" and t.intermediate_values
                                    for t in journal_trials(journal)):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR2)
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75, text


def journal_trials(path: Path) -> list:
    import optuna

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(path)))
    return optuna.load_study(study_name="synthetic", storage=storage).get_trials()


# ---------------------------------------------------------------- real jobs

ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL",
         "DEADLINE", "OUT_OF_MEMORY"}  # a job in these states will not run again


def squeue_state(job: str) -> list[str] | None:
    """'<state> <reason>' of each task of `job` in any state (a requeued task passes
    through states that plain squeue leaves out); None when squeue could not answer (a
    busy controller times out: that is not an empty queue)."""
    out = subprocess.run(["squeue", "--noheader", "--states=all", f"--jobs={job}",
                          "-o", "%T %r"], capture_output=True, text=True)
    return out.stdout.split("\n")[:-1] if out.returncode == 0 else None


def wait_done(job: str, release_requeued: bool = False) -> None:
    """Wait until every task of `job` has ended for good. With `release_requeued`, a
    requeued task is started 3 s after its requeue instead of Slurm's ~2 min: started at
    once, slurmd may still hold its last instance's credential as revoked and refuse it
    ("Killing non-startable batch JobId=N: Job credential revoked"), and it ends FAILED."""
    deadline = time.time() + TIMEOUT_S
    state: list[str] | None = None
    held_since: float | None = None
    while time.time() < deadline:
        state = squeue_state(job)
        if state is not None and {line.split()[0] for line in state} <= ENDED:
            return
        held = release_requeued and any(line.endswith(" BeginTime") for line in state or [])
        held_since = (held_since or time.time()) if held else None
        if held_since is not None and time.time() - held_since >= 3:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"],
                           capture_output=True)
        time.sleep(0.5)
    subprocess.run(["scancel", job])
    pytest.fail(f"job {job} still queued after {TIMEOUT_S} s: {state}")


def submit(tmp_path: Path, *args: str) -> str:
    r = bench_cli("slurm", "submit", "synthetic", "--out", str(tmp_path / "lb"), *args,
                  cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().splitlines()[-1]
    assert job.isdigit(), r.stdout
    return job


def study_trials(tmp_path: Path) -> list:
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(tmp_path / "lb" / "synthetic" / "optuna.journal")))
    return optuna.load_study(study_name="synthetic", storage=storage).get_trials()


def logs(tmp_path: Path) -> str:
    folder = tmp_path / "lb" / "synthetic" / "slurm"
    return "\n".join(p.read_text() for p in folder.glob("*.out"))


def wait_mid_trial(tmp_path: Path, job: str, max_steps: int | None = None) -> None:
    """Wait until a trial has reported at least 2 steps (at most `max_steps`); else cancel."""
    journal = tmp_path / "lb" / "synthetic" / "optuna.journal"
    deadline = time.time() + 120
    while time.time() < deadline:
        running = [t for t in study_trials(tmp_path) if t.state.name == "RUNNING"] \
            if journal.exists() else []
        steps = len(running[0].intermediate_values) if running else 0
        if steps >= 2 and (max_steps is None or steps <= max_steps):
            return
        time.sleep(0.3)
    subprocess.run(["scancel", job])
    pytest.fail("no trial reached step 2: " + logs(tmp_path))


def jobs_in(folder: Path) -> list[str]:
    """Jobs Slurm still knows (queued, running or recently ended) submitted from `folder`."""
    out = subprocess.run(["squeue", "--noheader", "--states=all", "-o", "%i %Z"],
                         capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines()
            if line.split(maxsplit=1)[1:] == [str(folder)]]


@pytest.mark.slurm
@slurm_running
def test_injection_through_time_or_sbatch_arg_is_refused_before_sbatch(tmp_path: Path) -> None:
    """A newline in --time or --sbatch-arg once put a command in the script (it ran, and
    the #SBATCH lines after it were ignored): now exit 2, no job, no file."""
    marker = tmp_path / "injected"
    for flag, value in (("--time", f"00:05:00\ntouch {marker}"),
                        ("--sbatch-arg", f"--mem=100M\ntouch {marker}")):
        r = bench_cli("slurm", "submit", "synthetic", "--trials", "1", "--out",
                      str(tmp_path / "lb"), flag, value, cwd=tmp_path)
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stderr.startswith(f"error: {flag}: ") and repr(value) in r.stderr
    time.sleep(2)
    assert jobs_in(tmp_path) == [] and not marker.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slurm
@slurm_running
def test_array_of_4_finishes_exactly_8_trials(tmp_path: Path) -> None:
    job = submit(tmp_path, "--trials", "8", "--workers", "4", "--set", "sleep_s=0.05",
                 "--pruner", "none")
    wait_done(job)
    rows = leaderboard.read_trials(tmp_path / "lb", "synthetic")
    assert len(rows) == 8, logs(tmp_path)
    assert rows["trial_uid"].is_unique and sorted(rows["trial_number"]) == list(range(8))
    assert set(rows["state"]) == {"COMPLETE"}
    trials = study_trials(tmp_path)
    assert len(trials) == 8 and all(t.state.is_finished() for t in trials)
    per_worker = sorted(t.user_attrs["worker_id"] for t in trials)
    assert per_worker == sorted([f"{job}-{i}" for i in range(4)] * 2)
    status = bench_cli("slurm", "status", "synthetic", "--out", str(tmp_path / "lb"))
    assert f"job {job}: 8/8 trials finished by 4 workers" in status.stdout, status.stderr


@pytest.mark.slurm
@slurm_running
def test_usr2_suspends_trial_requeues_and_resumes_it_exactly(tmp_path: Path) -> None:
    import optuna

    from bench.lifecycle import train
    from bench.registry import get_task
    from bench.trial import local_context

    job = submit(tmp_path, "--trials", "3", "--workers", "1", "--set", "sleep_s=1.0",
                 "--set", "epochs=6", "--set", "noise=0.5", "--pruner", "none")
    wait_mid_trial(tmp_path, job, max_steps=3)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_done(job, release_requeued=True)

    trials = study_trials(tmp_path)
    assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE
                                    for t in trials), logs(tmp_path)
    rows = leaderboard.read_trials(tmp_path / "lb", "synthetic")
    assert len(rows) == 3 and rows["trial_uid"].is_unique
    assert set(rows["state"]) == {"COMPLETE"}
    resumed = rows[rows["attempts"] == 2]
    assert len(resumed) == 1, logs(tmp_path)
    row = resumed.iloc[0]
    t = next(x for x in trials if x.user_attrs["bench"]["uid"] == row["trial_uid"])
    assert sorted(t.intermediate_values) == list(range(6))
    curve = leaderboard.read_curves(tmp_path / "lb", "synthetic", [row["trial_uid"]])
    assert sorted(curve["step"]) == list(range(6))  # each step once: kept, not re-run
    # the resumed trial ends exactly where an uninterrupted run of it ends
    task = get_task("synthetic")
    params = {**task.defaults, "epochs": 6, "noise": 0.5, "sleep_s": 0.0, **t.params}
    ref = train(task, params, local_context(int(t.user_attrs["bench"]["seed"]), "cpu",
                                            tmp_path / "ref", "loss"))
    assert row["objective"] == ref["loss"]
    assert "suspended its trial; requeueing" in logs(tmp_path)


@pytest.mark.slurm
@pytest.mark.slow  # 90 s: slurmd retries what it could not tell the stopped controller
@slurm_running
def test_a_worker_requeues_itself_through_a_controller_that_does_not_answer(
        tmp_path: Path) -> None:
    """slurmctld stopped (SIGSTOP: a controller too busy to answer within MessageTimeout)
    when a warned worker requeues itself: scontrol fails, the job retries it, and once the
    controller answers again the job comes back and finishes its trial. (The warning is
    sent to the worker itself: a stopped controller would not forward scancel's.)"""
    found = subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True, text=True)
    pids = [int(p) for p in found.stdout.split()]
    if len(pids) != 1:
        pytest.skip(f"no single slurmctld process on this host: {found.stdout!r}")
    try:
        os.kill(pids[0], 0)
    except PermissionError:
        pytest.skip("the slurmctld process belongs to another user: cannot stop it")
    job = submit(tmp_path, "--trials", "1", "--workers", "1", "--set", "sleep_s=1.0",
                 "--set", "epochs=4", "--pruner", "none")
    wait_mid_trial(tmp_path, job, max_steps=2)
    worker = [p for p in map(int, subprocess.run(
        ["pgrep", "-f", f"worker-id {job}-0"], capture_output=True, text=True).stdout.split())
        if Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0] != b"srun"]
    assert len(worker) == 1, worker
    os.kill(pids[0], signal.SIGSTOP)
    try:
        os.kill(worker[0], signal.SIGUSR2)
        deadline = time.time() + 120
        while "failed (try 1 of 5)" not in logs(tmp_path) and time.time() < deadline:
            time.sleep(0.5)
    finally:
        os.kill(pids[0], signal.SIGCONT)
    assert "failed (try 1 of 5)" in logs(tmp_path), logs(tmp_path)
    wait_done(job, release_requeued=True)
    rows = leaderboard.read_trials(tmp_path / "lb", "synthetic")
    assert list(rows["state"]) == ["COMPLETE"] and list(rows["attempts"]) == [2], \
        logs(tmp_path)
    assert "could not requeue" not in logs(tmp_path)


@pytest.mark.slurm
@slurm_running
def test_requeue_mid_trial_resumes_that_trial_and_totals_stay_exact(tmp_path: Path) -> None:
    """`scontrol requeue` (SIGTERM, no warning): the running trial saves its state at the
    epoch's end, and the requeued worker resumes it, then runs only what its quota lacks."""
    job = submit(tmp_path, "--trials", "3", "--workers", "1", "--set", "sleep_s=0.7",
                 "--set", "epochs=6", "--pruner", "none")
    wait_mid_trial(tmp_path, job)
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait_done(job, release_requeued=True)

    trials = study_trials(tmp_path)
    assert len(trials) == 3 and all(t.state.is_finished() for t in trials), logs(tmp_path)
    rows = leaderboard.read_trials(tmp_path / "lb", "synthetic")
    assert len(rows) == 3 and rows["trial_uid"].is_unique
    assert set(rows["state"]) == {"COMPLETE"}, logs(tmp_path)
    assert sorted(rows["attempts"]) == [1, 1, 2]


@pytest.mark.slurm
@pytest.mark.ray
@slurm_running
def test_ray_mode_runs_a_ray_cluster_inside_one_allocation(tmp_path: Path) -> None:
    pytest.importorskip("ray.tune")
    job = submit(tmp_path, "--mode", "ray", "--trials", "4", "--workers", "1",
                 "--cpus-per-worker", "2", "--cpus-per-trial", "1", "--set", "epochs=3",
                 "--pruner", "asha")
    wait_done(job)
    rows = leaderboard.read_trials(tmp_path / "lb", "synthetic")
    assert len(rows) == 4 and rows["trial_uid"].is_unique, logs(tmp_path)
    assert set(rows["backend"]) == {"ray"} and set(rows["state"]) <= {"COMPLETE", "PRUNED"}
    assert "Ray experiment 'synthetic'" in logs(tmp_path)
    leftover = subprocess.run(["pgrep", "-f", f"/tmp/ray-{job}/"], capture_output=True)
    assert leftover.returncode == 1, "the job's Ray processes outlived it"


def test_a_variant_slot_resumes_its_suspended_point(tmp_path: Path) -> None:
    """A Slurm slot running a variant takes enqueued points: a point suspended by SIGUSR2
    belongs to that slot (its worker_id), so the restarted slot resumes it and every
    (point, seed) finishes exactly once."""
    import sys

    from bench.launchers.slurm import SubmitOptions, prepare

    out, journal = tmp_path / "lb", tmp_path / "study.journal"
    sets = ["sleep_s=0.3", "epochs=6"]
    assert prepare(SubmitOptions(task="synthetic", variant="grid", study="synthetic",
                                 storage=str(journal), overrides=sets, out=out)) == 12
    cmd = [sys.executable, "-m", "bench.cli", "run", "synthetic", "--variant", "grid",
           "--study", "synthetic", "--storage", str(journal), "--worker-id", "w0",
           "--trials", "12", "--set", "sleep_s=0.3", "--set", "epochs=6", "--out", str(out),
           "--quiet"]
    suspend_mid_trial(cmd, journal)
    [held] = [t for t in journal_trials(journal) if t.user_attrs.get("suspended")]
    assert held.user_attrs["worker_id"] == "w0"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    trials = journal_trials(journal)
    assert len(trials) == 12 and all(t.state.name == "COMPLETE" for t in trials)
    assert sorted(trials[held.number].intermediate_values) == list(range(6))
    rows = leaderboard.read_trials(out, "synthetic")
    assert len(rows) == 12 and rows.groupby(["param_x", "param_y", "seed"]).size().eq(1).all()
    uid = held.user_attrs["bench"]["uid"]
    assert rows.set_index("trial_uid").loc[uid, "attempts"] == 2
