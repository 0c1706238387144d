"""Stop requests: SIGINT, SIGTERM and SIGUSR2 become a flag that the trial lifecycle reads at
epoch and trial boundaries, never an exception raised wherever the main thread happens to be.

- The first SIGINT (Ctrl-C) or SIGTERM asks the run to stop: the running trial finishes its
  epoch, saves its state and is left to be resumed; no new trial starts.
- SIGUSR2 (Slurm's `--signal=USR2@90`, a preemption notice) does the same; a worker slot
  then exits with EXIT_SUSPENDED so that its job requeues it.
- A second SIGINT or SIGTERM stops now, but only while a trial is inside its training code
  (`interruptible()`): there KeyboardInterrupt is raised, and the trial resumes later from
  its last saved epoch. Anywhere else (a row being written, the study's storage being
  updated) it is remembered and acted on at the next boundary, so no write is torn.

Python runs signal handlers in the main thread only; other threads (torch, pyarrow) never
see these exceptions.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

EXIT_SUSPENDED = 75  # EX_TEMPFAIL: a worker slot stopped on SIGUSR2; requeue it to continue
EXIT_CODES: dict[int, int] = {signal.SIGINT: 130, signal.SIGTERM: 143,
                              signal.SIGUSR2: EXIT_SUSPENDED}
NAMES: dict[int, str] = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM",
                         signal.SIGUSR2: "SIGUSR2"}


class _State:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        self.count = 0
        self.zone = 0  # > 0 while the main thread is in a trial's training code
        self.quiet = False


_S = _State()


def request_stop(signum: int = signal.SIGINT) -> None:
    """Ask the run to stop at the next boundary (what a first signal does)."""
    if _S.signum is None or signum != signal.SIGUSR2:
        _S.signum = signum
    _S.event.set()


def stop_requested() -> bool:
    return _S.event.is_set()


def stop_reason() -> str:
    return NAMES.get(_S.signum or signal.SIGINT, "a signal")


def current_signal() -> int:
    """The signal that asked the run to stop (to forward to worker processes)."""
    return _S.signum or signal.SIGINT


def exit_code() -> int:
    """The exit status for the signal that stopped the run (130, 143 or 75)."""
    return EXIT_CODES.get(_S.signum or signal.SIGINT, 130)


def reset() -> None:
    """Forget earlier requests (tests, and a new run in the same process)."""
    _S.event.clear()
    _S.signum, _S.count, _S.zone = None, 0, 0


def _handler(signum: int, frame: Any) -> None:
    _S.count += 1 if signum != signal.SIGUSR2 else 0
    first = not _S.event.is_set()
    request_stop(signum)
    if signum == signal.SIGUSR2:
        return
    if first:
        if not _S.quiet:
            print(f"\n{NAMES[signum]}: stopping after the running epoch (its state is saved "
                  "and the next run resumes it); press Ctrl-C again to stop now",
                  file=sys.stderr, flush=True)
        return
    if _S.zone > 0:
        raise KeyboardInterrupt(f"{NAMES[signum]} twice")


def install(quiet: bool = False) -> None:
    """Route SIGINT, SIGTERM and SIGUSR2 to the stop flag (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    _S.quiet = quiet
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, _handler)


def hard_stop_requested() -> bool:
    """A second signal arrived while it could not be acted on at once."""
    return _S.count >= 2


@contextmanager
def interruptible() -> Iterator[None]:
    """Training code: a second SIGINT/SIGTERM raises KeyboardInterrupt here, at once."""
    _S.zone += 1
    try:
        if hard_stop_requested():
            raise KeyboardInterrupt("stop requested twice")
        yield
    finally:
        _S.zone -= 1


def die_with_parent() -> None:
    """Linux: this process gets SIGTERM when its parent dies (no orphaned workers)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        request_stop(signal.SIGTERM)
