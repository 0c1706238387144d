"""A real PostgreSQL study: concurrent workers, a worker killed mid-trial, heartbeat retry.

Needs a server: `slurm/local-postgres.sh` (as root) starts Debian's on localhost with the
role and database of the default URL below; `BENCH_TEST_POSTGRES` names another. Skips
cleanly when none answers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import leaderboard

pytestmark = pytest.mark.postgres
URL = os.environ.get("BENCH_TEST_POSTGRES", "postgresql://bench:bench@localhost:5432/bench")
GRACE_S = 30  # bench's RDB storages: heartbeat every 10 s, stale after 30 s


def postgres_up() -> bool:
    try:
        import psycopg2
    except ImportError:
        return False
    try:
        psycopg2.connect(URL, connect_timeout=3).close()
    except psycopg2.Error:
        return False
    return True


if not postgres_up():
    pytest.skip(f"no PostgreSQL answers at {URL} (run slurm/local-postgres.sh as root, or set "
                "BENCH_TEST_POSTGRES)", allow_module_level=True)


def worker(out: Path, study: str, *count: str) -> list[str]:
    return [sys.executable, "-m", "bench.cli", "run", "synthetic", "--storage", URL, "--study",
            study, *count, "--set", "sleep_s=0.5", "--set", "epochs=6",
            "--pruner", "none", "--out", str(out), "--quiet"]


@pytest.fixture
def study_name() -> Iterator[str]:
    import optuna

    name = f"pg-test-{uuid.uuid4().hex[:10]}"
    yield name
    try:
        optuna.delete_study(study_name=name, storage=URL)
    except KeyError:
        pass


def test_killed_worker_trial_fails_is_retried_and_study_completes(
        tmp_path: Path, study_name: str) -> None:
    import optuna
    from optuna.trial import TrialState

    out = tmp_path / "lb"
    procs = [subprocess.Popen(worker(out, study_name, "--trials", "12"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # every worker in the middle of a trial
            try:
                trials = optuna.load_study(study_name=study_name, storage=URL).get_trials()
            except KeyError:
                trials = []
            running = [t for t in trials if t.state == TrialState.RUNNING
                       and t.intermediate_values]
            if len(running) == 4:
                break
            time.sleep(0.2)
        else:
            pytest.fail("4 workers never ran trials at once")
        procs[0].send_signal(signal.SIGKILL)
        killed_at = time.time()
        for p in procs[1:]:
            out_text, _ = p.communicate(timeout=180)
            assert p.returncode == 0, out_text
        procs[0].wait()
        assert procs[0].returncode == -signal.SIGKILL
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    # The victim's trial is RUNNING until its heartbeat is GRACE_S old; a late run then
    # marks it FAIL (with its FAIL row) and, asked for one more, runs the retry Optuna
    # enqueued.
    study = optuna.load_study(study_name=study_name, storage=URL)
    stale = [t for t in study.get_trials() if t.state == TrialState.RUNNING]
    assert len(stale) == 1
    victim = stale[0]
    time.sleep(max(0.0, killed_at + GRACE_S + 2 - time.time()))
    late = subprocess.run(worker(out, study_name, "--add", "1"), capture_output=True,
                          text=True, timeout=180)  # one more: Optuna's retry is asked first
    assert late.returncode == 0, late.stderr

    trials = study.get_trials()
    assert all(t.state.is_finished() for t in trials), [t.state for t in trials]
    assert trials[victim.number].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == victim.params
    rows = leaderboard.read_trials(out, "synthetic", study=study_name)
    assert len(rows) == len(trials) and rows["trial_uid"].is_unique  # one row per trial
    assert sorted(rows["trial_number"]) == [t.number for t in trials]
    fail = rows[rows["trial_number"] == victim.number].iloc[0]
    assert fail["state"] == "FAIL" and "heartbeat" in fail["error"]
    retry = rows[rows["trial_number"] == retries[0].number].iloc[0]
    assert retry["state"] == "COMPLETE" and retry["trial_uid"] != fail["trial_uid"]
    # the study's 12 (the victim's FAIL among them), then the retry the late worker ran
    assert len(trials) == 13 and (rows["state"] == "COMPLETE").sum() == 12, (
        [(t.number, t.state.name, t.system_attrs, sorted(t.user_attrs)) for t in trials],
        late.stdout, late.stderr)


def test_a_killed_run_leaves_nothing_that_a_plain_rerun_does_not_mend(
        tmp_path: Path, study_name: str) -> None:
    """SIGKILL while trial 0's row is still being written (its result already told) and
    trial 1 runs. Within the grace period a rerun must not touch either (the run could be
    alive on another host); after it, the same command writes trial 0's row from the
    study's record and fails trial 1 (its FAIL row): the total is reached, as on a file
    (Optuna's retry of trial 1 waits for the next trial asked)."""
    import optuna
    from optuna.trial import TrialState

    out, marker = tmp_path / "lb", tmp_path / "at-row-write"
    cmd = worker(out, study_name, "--trials", "2")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "BENCH_PAUSE": "row-write",
                                 "BENCH_PAUSE_FILE": str(marker), "BENCH_PAUSE_S": "120"})
    try:
        deadline = time.time() + 120
        while True:  # trial 0 told, its row held at the rename; trial 1 under way
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            try:
                trials = optuna.load_study(study_name=study_name, storage=URL).get_trials()
            except KeyError:
                trials = []
            if marker.exists() and len(trials) == 2 and trials[0].state == \
                    TrialState.COMPLETE and trials[1].intermediate_values:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        killed_at = time.time()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert leaderboard.read_trials(out, "synthetic", study=study_name).empty
    early = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert early.returncode == 0 and "nothing to do" in early.stderr, early.stderr
    assert leaderboard.read_trials(out, "synthetic", study=study_name).empty  # not yet
    time.sleep(max(0.0, killed_at + GRACE_S + 2 - time.time()))
    late = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert late.returncode == 0, late.stderr
    assert "repaired the record of trials [0]" in late.stderr, late.stderr
    assert "marked FAIL: trials [1]" in late.stderr, late.stderr
    study = optuna.load_study(study_name=study_name, storage=URL)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL,
                                         TrialState.WAITING]
    assert trials[2].system_attrs.get("failed_trial") == 1
    rows = leaderboard.read_trials(out, "synthetic", study=study_name)
    rows = rows.set_index("trial_number").sort_index()
    assert list(rows.index) == [0, 1] and list(rows["state"]) == ["COMPLETE", "FAIL"]
    assert rows.loc[0, "objective"] == trials[0].value
    assert "heartbeat" in rows.loc[1, "error"]
