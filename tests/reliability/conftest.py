"""Fixtures of the fault-injection suite, and a summary of what it injected and found.

Every test that injects faults records them with the `tally` fixture; at the end of the
session pytest prints one line per test (faults injected, rows lost, rows wrong, trials
doubled, outcome) and the totals: the numbers recorded in benchmarks/RESULTS.md."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import Storage, Tally, drop_pg_study, make_storage, postgres_up

_PG_UP: bool | None = None


_TALLIES: list[Tally] = []


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> Tally:
    t = Tally(request.node.nodeid.split("::", 1)[-1])
    _TALLIES.append(t)
    return t


def need_postgres() -> None:
    global _PG_UP
    if _PG_UP is None:
        _PG_UP = postgres_up()
    if not _PG_UP:
        pytest.skip("no PostgreSQL server answers (slurm/local-postgres.sh, or set "
                    "BENCH_TEST_POSTGRES)")


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator:
    """`make_store(kind)`: a fresh study location of that kind (a PostgreSQL study is
    dropped afterwards; skipped when no server answers)."""
    made: list[Storage] = []

    def make(kind: str, out: Path | None = None) -> Storage:
        if kind == "postgres":
            need_postgres()
        st = make_storage(kind, out or tmp_path / "lb")
        made.append(st)
        return st

    yield make
    for st in made:
        if st.kind == "postgres":
            drop_pg_study(st.study)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not any(t.faults for t in _TALLIES):
        return
    outcome = {}
    for key in ("passed", "failed", "xfailed", "xpassed", "skipped"):
        for rep in terminalreporter.stats.get(key, []):
            if rep.when == "call" or key == "skipped":
                outcome[rep.nodeid.split("::", 1)[-1]] = key
    tr = terminalreporter
    tr.section("reliability: faults injected and what the invariant found")
    tr.write_line(f"{'test':<58} {'faults':>6} {'checks':>6} {'lost':>4} {'wrong':>5} "
                  f"{'doubled':>7} {'stuck':>5}  outcome")
    total = Tally("total")
    for t in _TALLIES:
        if not t.faults:
            continue
        tr.write_line(f"{t.nodeid:<58} {t.faults:>6} {t.checks:>6} {t.lost:>4} {t.wrong:>5} "
                      f"{t.doubled:>7} {t.unfinished:>5}  {outcome.get(t.nodeid, '?')}")
        for k in ("faults", "checks", "lost", "wrong", "doubled", "unfinished"):
            setattr(total, k, getattr(total, k) + getattr(t, k))
    tr.write_line(f"{'total':<58} {total.faults:>6} {total.checks:>6} {total.lost:>4} "
                  f"{total.wrong:>5} {total.doubled:>7} {total.unfinished:>5}")
