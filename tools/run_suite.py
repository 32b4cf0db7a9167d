"""The whole test suite (`make test`, CI): the unit tests beside the rest, not after it.

The engine, HTTP and integration tests spend most of their time in vLLM engines whose
worker is bound to the first core (vLLM's CPU binding reserves the last one for the
front end), compiling or waiting on it; the unit tests are pure and need one core. So
on a machine with two or more cores the unit tests run in a second pytest process pinned
to the last core, at the same time, and their output is printed when the rest is done.
One core, or a selection (`make test ARGS=...`): one pytest as before.

    python tools/run_suite.py [pytest args...]

Exit status: 0 when both runs pass, else the first failing run's (a half that selects no
test, pytest's 5, fails nothing unless the other selects none either).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
UNIT = "tests/unit"
NO_TESTS = 5  # pytest's exit status when nothing was collected


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def _pin_to(core: int):
    """For the child only: its CPU set (and its torch/OpenMP threads with it)."""
    return lambda: os.sched_setaffinity(0, {core})


def _run_split(args: list[str]) -> int:
    last = _cores()[-1]
    with tempfile.NamedTemporaryFile("w+", prefix="unit-", suffix=".log") as log:
        started = time.monotonic()
        unit = subprocess.Popen(
            [*PYTEST, UNIT, *args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_pin_to(last),
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        print(f"run_suite: {UNIT} in the background on core {last}", flush=True)
        rest = subprocess.call([*PYTEST, "--ignore", UNIT, *args], cwd=ROOT)
        unit_rc = unit.wait()
        log.seek(0)
        print(f"\nrun_suite: {UNIT} (started with the rest, {time.monotonic() - started:.0f} s "
              "until both ended):", flush=True)  # fmt: skip
        sys.stdout.write(log.read())
    return _combined(rest, unit_rc)


def _combined(rest: int, unit: int) -> int:
    """Either run's failure fails the suite; a ``-k`` that selects nothing in one of the two
    halves (pytest's 5, "no tests collected") is not one, unless it selects nothing at all."""
    if {rest, unit} == {NO_TESTS}:
        return NO_TESTS
    return next((rc for rc in (rest, unit) if rc not in (0, NO_TESTS)), 0)


def main(argv: list[str]) -> int:
    selecting = any(not a.startswith("-") for a in argv)  # a path or node id
    if selecting or len(_cores()) < 2:
        return subprocess.call([*PYTEST, *argv], cwd=ROOT)
    return _run_split(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
