"""Named pause points for fault-injection tests: `BENCH_PAUSE=<point>` makes the process
touch `BENCH_PAUSE_FILE` and sleep `BENCH_PAUSE_S` seconds (default 2) when it reaches that
point, so a test can send a signal or kill it at exactly that moment. Unset, it is one
dictionary lookup."""

from __future__ import annotations

import os
import time
from pathlib import Path

POINTS = ("trial-start", "row-write", "repair", "tell", "ask")


def pause(point: str) -> None:
    if os.environ.get("BENCH_PAUSE") != point:
        return
    marker = os.environ.get("BENCH_PAUSE_FILE")
    if marker:
        Path(marker).write_text(str(os.getpid()))
    time.sleep(float(os.environ.get("BENCH_PAUSE_S", "2")))
